// The submit page: a YAML editor with line numbers, checked as the user types (POST /v1/jobs:validate,
// debounced); each field error is marked beside its line. Estimate prices the job; Submit starts it
// and opens its page.

import { ApiError, call } from "./api.js";
import { $, el, replaceChildren, show } from "./dom.js";
import { formatCount, formatUsd } from "./format.js";

const VALIDATE_DELAY_MILLISECONDS = 400;
const YAML = "application/yaml";

const editor = $("#spec");
const gutter = $("#gutter");
let validateTimer = null;
let validation = null; // the AbortController of the check in flight
let liveChecks = true; // false once the server says it has no validate route
let lineErrors = new Map(); // line -> [FieldError]

function lineCount() {
  return editor.value.split("\n").length;
}

function renderGutter() {
  const count = lineCount();
  replaceChildren(
    gutter,
    Array.from({ length: count }, (_, index) => {
      const line = index + 1;
      const errors = lineErrors.get(line);
      const row = el("div", { class: errors ? "line has-error" : "line", dataset: { line } });
      if (errors) {
        const message = errors.map((error) => `${error.field}: ${error.message}`).join("\n");
        row.dataset.message = message;
        row.title = message;
        row.append(el("span", { class: "marker", text: "●" }));
      }
      row.append(el("span", { class: "number", text: line }));
      return row;
    }),
  );
  gutter.scrollTop = editor.scrollTop;
  renderNotes();
}

const noteText = (error) => `${String(error.field).split(".").pop()}: ${error.message}`;

// Each line's errors also written at the right end of that line, over the editor, as it scrolls.
function renderNotes() {
  const notes = $("#notes");
  const style = getComputedStyle(editor);
  const lineHeight = parseFloat(style.lineHeight) || 18;
  const top = parseFloat(style.paddingTop) || 0;
  replaceChildren(
    notes,
    [...lineErrors].map(([line, errors]) => {
      const note = el("div", { class: "note", dataset: { line }, text: errors.map(noteText).join("; ") });
      note.style.top = `${top + (line - 1) * lineHeight - editor.scrollTop}px`;
      note.style.height = `${lineHeight}px`;
      return note;
    }),
  );
}

function goToLine(line) {
  const lines = editor.value.split("\n");
  const offset = lines.slice(0, line - 1).reduce((sum, text) => sum + text.length + 1, 0);
  editor.focus();
  editor.setSelectionRange(offset, offset + (lines[line - 1] || "").length);
  const lineHeight = parseFloat(getComputedStyle(editor).lineHeight) || 18;
  editor.scrollTop = Math.max(0, (line - 3) * lineHeight);
}

function showErrors(errors) {
  const withLine = errors.filter((error) => Number.isInteger(error.line) && error.line >= 1);
  const general = errors.filter((error) => !withLine.includes(error));
  lineErrors = new Map();
  for (const error of withLine) {
    if (!lineErrors.has(error.line)) lineErrors.set(error.line, []);
    lineErrors.get(error.line).push(error);
  }
  renderGutter();
  const generalList = $("#general-errors");
  replaceChildren(generalList, general.map((error) => el("li", { text: `${error.field}: ${error.message}` })));
  generalList.hidden = general.length === 0;
  const lineList = $("#line-errors");
  replaceChildren(
    lineList,
    withLine
      .sort((a, b) => a.line - b.line)
      .map((error) => {
        const item = el("li", { dataset: { line: error.line } }, el("button", { type: "button", class: "link", text: `line ${error.line}` }), ` ${error.field}: ${error.message}`);
        item.querySelector("button").addEventListener("click", () => goToLine(error.line));
        return item;
      }),
  );
  lineList.hidden = withLine.length === 0;
}

function status(text, state) {
  const node = $("#validation-status");
  node.textContent = text;
  node.dataset.state = state;
}

// A refusal's field errors beside their lines; a refusal without any gets its message above the editor.
function showRefusal(error, what, { reveal = false } = {}) {
  if (error.errors.length > 0) {
    showErrors(error.errors);
    const lines = error.errors.map((found) => found.line).filter(Number.isInteger);
    if (reveal && lines.length > 0) goToLine(Math.min(...lines));
    show($("#submit-error"), error.status === 422 ? "" : `${what}: ${error.message}`);
  } else {
    showErrors([]);
    show($("#submit-error"), `${what}: ${error.message}`);
  }
}

async function validate() {
  if (!liveChecks) return;
  if (validation) validation.abort();
  validation = new AbortController();
  status("checking…", "checking");
  try {
    const result = await call("/v1/jobs:validate", { method: "POST", body: editor.value, contentType: YAML, signal: validation.signal });
    showErrors([]);
    show($("#submit-error"), "");
    const warnings = ((result && result.warnings) || []).map((warning) =>
      (typeof warning === "string" ? warning : `${warning.field}: ${warning.message}`));
    status(warnings.length ? `valid; warnings: ${warnings.join("; ")}` : "valid", "valid");
  } catch (error) {
    if (error.name === "AbortError") return;
    if (error.status === 404 || error.status === 405) {
      liveChecks = false;
      status("this server does not check as you type: Submit and Estimate check the spec", "unavailable");
      return;
    }
    if (error.status === 422) {
      status(`${error.errors.length || 1} problem(s)`, "invalid");
      showRefusal(error, "The spec is refused");
    } else {
      status("cannot check the spec now", "error");
      show($("#submit-error"), `Cannot check the spec: ${error.message}`);
    }
  }
}

function scheduleValidation() {
  clearTimeout(validateTimer);
  validateTimer = setTimeout(validate, VALIDATE_DELAY_MILLISECONDS);
}

function busy(text) {
  $("#busy").hidden = !text;
  $("#busy-text").textContent = text || "";
  $("#submit").disabled = Boolean(text);
  $("#estimate").disabled = Boolean(text);
}

function renderEstimate(estimate) {
  const rows = [
    ["training prompts", formatCount(estimate.prompts.train)],
    ["held-out prompts", formatCount(estimate.prompts.holdout)],
    ["prompts collected", formatCount(estimate.prompts.collected)],
    ["shortfall", formatCount(estimate.prompts.shortfall)],
    ["teacher requests", formatCount(estimate.teacher.requests)],
    ["teacher prompt tokens", formatCount(estimate.teacher.promptTokens)],
    ["teacher completion tokens", formatCount(estimate.teacher.completionTokens)],
    ["teacher answers (upper bound)", formatUsd(estimate.teacher.costUsd)],
    ["prompt generation (spent)", formatUsd(estimate.generation.costUsd)],
    ["total", formatUsd(estimate.totalUsd)],
  ];
  replaceChildren($("#estimate-table"), el("tbody", {}, rows.map(([name, value]) => el("tr", { dataset: { fact: name } }, el("th", { text: name }), el("td", { class: "num", text: value })))));
  const warnings = [
    ...estimate.prompts.warnings,
    ...(estimate.warnings || []).map((warning) => `${warning.field}: ${warning.message}`),
  ];
  replaceChildren($("#estimate-warnings"), warnings.map((warning) => el("li", { text: warning })));
  $("#estimate-result").hidden = false;
}

async function estimate() {
  busy("estimating: building the prompts and pricing them can take a minute…");
  show($("#submit-error"), "");
  try {
    renderEstimate(await call("/v1/jobs:estimate", { method: "POST", body: editor.value, contentType: YAML }));
    showErrors([]);
  } catch (error) {
    $("#estimate-result").hidden = true;
    showRefusal(error, "Cannot estimate the job", { reveal: true });
  } finally {
    busy("");
  }
}

async function submit() {
  busy("submitting…");
  show($("#submit-error"), "");
  try {
    const job = await call("/v1/jobs", { method: "POST", body: editor.value, contentType: YAML });
    location.assign(`/jobs/${encodeURIComponent(job.id)}`);
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    showRefusal(error, error.status === 429 ? "Over the tenant's quota" : "The job was not submitted", {
      reveal: true,
    });
    busy("");
  }
}

editor.addEventListener("input", () => {
  renderGutter();
  scheduleValidation();
});
editor.addEventListener("scroll", () => {
  gutter.scrollTop = editor.scrollTop;
  renderNotes();
});
editor.addEventListener("keydown", (event) => {
  // Tab indents (YAML wants spaces) instead of leaving the editor.
  if (event.key === "Tab" && !event.shiftKey && !event.ctrlKey && !event.metaKey && !event.altKey) {
    event.preventDefault();
    editor.setRangeText("  ", editor.selectionStart, editor.selectionEnd, "end");
    editor.dispatchEvent(new Event("input"));
  }
});
$("#estimate").addEventListener("click", estimate);
$("#submit").addEventListener("click", submit);

renderGutter();
validate();
