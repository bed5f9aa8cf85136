// Line charts as inline SVG: axes with round ticks, one polyline per series (its point count in
// data-points), and a legend. Redrawn whole on each update: a chart holds at most a few thousand points.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 560;
const HEIGHT = 260;
const MARGIN = { top: 12, right: 16, bottom: 36, left: 64 };
const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// About `count` round tick values covering [low, high].
export function ticks(low, high, count = 5) {
  if (!(high > low)) return [low];
  const step = niceStep((high - low) / count);
  const values = [];
  for (let value = Math.ceil(low / step) * step; value <= high + step * 1e-9; value += step) {
    values.push(Number(value.toPrecision(12)));
  }
  return values;
}

function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(raw));
  const fraction = raw / power;
  const nice = fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10;
  return nice * power;
}

function label(value) {
  const size = Math.abs(value);
  if (value !== 0 && (size >= 1e5 || size < 1e-3)) return value.toExponential(1);
  return String(Number(value.toPrecision(4)));
}

function extent(values, pad) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (low === high) {
    const spread = Math.abs(low) * 0.1 || 1;
    low -= spread;
    high += spread;
  } else if (pad) {
    const margin = (high - low) * 0.05;
    low -= margin;
    high += margin;
  }
  return [low, high];
}

// series: [{name, points: [[x, y], ...]}]; draws into `container` (replacing what it held).
export function lineChart(container, series, { xLabel = "step", emptyText = "No points yet." } = {}) {
  const drawn = series.filter((one) => one.points.length > 0);
  container.replaceChildren();
  if (drawn.length === 0) {
    const empty = document.createElement("p");
    empty.className = "hint";
    empty.textContent = emptyText;
    container.append(empty);
    return;
  }
  const xs = drawn.flatMap((one) => one.points.map((point) => point[0]));
  const ys = drawn.flatMap((one) => one.points.map((point) => point[1]));
  const [x0, x1] = extent(xs, false);
  const [y0, y1] = extent(ys, true);
  const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const sx = (x) => MARGIN.left + ((x - x0) / (x1 - x0)) * plotWidth;
  const sy = (y) => MARGIN.top + (1 - (y - y0) / (y1 - y0)) * plotHeight;

  const root = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart-svg", role: "img" });
  const axes = svg("g", { class: "axes" });
  for (const value of ticks(y0, y1)) {
    const y = sy(value);
    axes.append(svg("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y, y2: y, class: "grid" }));
    axes.append(svg("text", { x: MARGIN.left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, label(value)));
  }
  for (const value of ticks(x0, x1, 6)) {
    const x = sx(value);
    axes.append(svg("line", { x1: x, x2: x, y1: HEIGHT - MARGIN.bottom, y2: HEIGHT - MARGIN.bottom + 4, class: "axis" }));
    axes.append(svg("text", { x, y: HEIGHT - MARGIN.bottom + 16, "text-anchor": "middle", class: "tick" }, label(value)));
  }
  axes.append(svg("line", { x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: HEIGHT - MARGIN.bottom, class: "axis" }));
  axes.append(svg("line", {
    x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: HEIGHT - MARGIN.bottom, y2: HEIGHT - MARGIN.bottom, class: "axis",
  }));
  axes.append(svg("text", { x: MARGIN.left + plotWidth / 2, y: HEIGHT - 4, "text-anchor": "middle", class: "axis-label" }, xLabel));
  root.append(axes);

  const legend = document.createElement("ul");
  legend.className = "legend";
  drawn.forEach((one, index) => {
    const colour = COLOURS[index % COLOURS.length];
    const points = one.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
    const line = svg("polyline", {
      points, fill: "none", stroke: colour, "stroke-width": 2, "data-series": one.name, "data-points": one.points.length,
    });
    line.append(svg("title", {}, one.name));
    root.append(line);
    if (one.points.length === 1) {
      const [x, y] = one.points[0];
      root.append(svg("circle", { cx: sx(x), cy: sy(y), r: 3, fill: colour }));
    }
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour;
    item.append(swatch, document.createTextNode(`${one.name} (${one.points.length})`));
    legend.append(item);
  });
  container.append(root, legend);
}
