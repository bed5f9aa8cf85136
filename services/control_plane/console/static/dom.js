// Building the page from data: every value goes in as text (textContent, attributes), never as markup.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "hidden") node.hidden = Boolean(value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

export function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function replaceChildren(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

export function show(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

export function $(selector) {
  return document.querySelector(selector);
}

// The page's live-update indicator (#live-status): what it says, and its state for the style sheet.
export function liveStatus(text, state) {
  const status = $("#live-status");
  status.textContent = text;
  status.dataset.state = state;
}
