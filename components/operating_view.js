// The Thresholds page's live view: ROC and precision-recall curves with each set's operating point, and the
// confusion matrices at the page's threshold. A Streamlit (st.components.v2) component, so that a threshold step
// moves the markers and rewrites the matrices in place: a Plotly chart whose figure changes is unmounted and drawn
// again from scratch, which was most of a slider step's time in the browser (bench/benchmark_browser.py). The
// curves are drawn once per set of curves (data.curves_key). The report keeps the Plotly figures (core/figures.py).
//
// Every text that comes from a file (set, class and folder names) is written with textContent, never as HTML.

const SVG = "http://www.w3.org/2000/svg";
const SIZE = 400; // viewBox units; the panel scales with its column
const MARGIN = { left: 56, right: 14, top: 10, bottom: 46 };
const PLOT = SIZE - MARGIN.left - MARGIN.right; // square plot area: the ROC diagonal at 45 degrees
const HOVER_RADIUS = 24; // viewBox units within which hovering picks the nearest curve point
const STATE = new WeakMap(); // per mounted component: its panels and the curves they draw

const sx = (x) => MARGIN.left + x * PLOT;
const sy = (y) => MARGIN.top + (1 - y) * PLOT;

function svg(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (parent) parent.appendChild(node);
  return node;
}

function div(className, parent, text) {
  const node = document.createElement("div");
  node.className = className;
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function star(cx, cy, outer) {
  const points = [];
  for (let i = 0; i < 10; i++) {
    const r = i % 2 ? outer * 0.45 : outer;
    const a = -Math.PI / 2 + (i * Math.PI) / 5;
    points.push(`${(cx + r * Math.cos(a)).toFixed(1)},${(cy + r * Math.sin(a)).toFixed(1)}`);
  }
  return points.join(" ");
}

function linePath(xs, ys) {
  let d = "";
  for (let i = 0; i < xs.length; i++) d += `${i ? "L" : "M"}${sx(xs[i]).toFixed(1)},${sy(ys[i]).toFixed(1)}`;
  return d;
}

// One chart: axes, grid, the curves (spec.curves: name, colour, x, y, threshold, dash), a legend, a hover tooltip,
// and a group for the operating points.
function buildPanel(parent, spec) {
  const box = div("panel", parent);
  div("title", box, spec.title);
  const plot = svg("svg", { viewBox: `0 0 ${SIZE} ${SIZE}`, role: "img", "aria-label": spec.title }, box);
  for (let i = 0; i <= 5; i++) {
    const v = i / 5;
    svg("line", { x1: sx(v), x2: sx(v), y1: sy(0), y2: sy(1), class: "grid" }, plot);
    svg("line", { x1: sx(0), x2: sx(1), y1: sy(v), y2: sy(v), class: "grid" }, plot);
    svg("text", { x: sx(v), y: sy(0) + 18, class: "tick", "text-anchor": "middle" }, plot).textContent = v.toFixed(1);
    svg("text", { x: sx(0) - 8, y: sy(v) + 4, class: "tick", "text-anchor": "end" }, plot).textContent = v.toFixed(1);
  }
  svg("rect", { x: sx(0), y: sy(1), width: PLOT, height: PLOT, class: "frame" }, plot);
  svg("text", { x: sx(0.5), y: SIZE - 8, class: "axis", "text-anchor": "middle" }, plot).textContent = spec.x_title;
  const yTitle = svg("text", { x: 0, y: 0, class: "axis", "text-anchor": "middle",
                               transform: `translate(14 ${sy(0.5)}) rotate(-90)` }, plot);
  yTitle.textContent = spec.y_title;
  for (const curve of spec.curves) {
    const line = svg("path", { d: linePath(curve.x, curve.y), stroke: curve.colour, class: "curve" }, plot);
    if (curve.dash) line.setAttribute("stroke-dasharray", curve.dash);
  }
  const markers = svg("g", {}, plot);
  const hover = svg("circle", { r: 5, class: "hover", visibility: "hidden" }, plot);
  const legend = div("legend", box);
  for (const curve of spec.curves) {
    const item = div("item", legend);
    const swatch = div(curve.dash ? "swatch dashed" : "swatch", item);
    swatch.style.borderColor = curve.colour;
    item.appendChild(document.createTextNode(curve.name));
  }
  const markerLegend = div("legend", box);
  const tip = div("tip", box);
  const hoverable = spec.curves.filter((c) => c.threshold);
  plot.addEventListener("mousemove", (event) => showNearest(event, plot, hoverable, spec, hover, tip, box));
  plot.addEventListener("mouseleave", () => { hover.setAttribute("visibility", "hidden"); tip.style.display = "none"; });
  return { markers, markerLegend };
}

function showNearest(event, plot, curves, spec, hover, tip, box) {
  const matrix = plot.getScreenCTM();
  if (!matrix) return;
  const at = new DOMPoint(event.clientX, event.clientY).matrixTransform(matrix.inverse());
  let best = null;
  for (const curve of curves) {
    for (let i = 0; i < curve.x.length; i++) {
      const d = Math.hypot(sx(curve.x[i]) - at.x, sy(curve.y[i]) - at.y);
      if (!best || d < best.d) best = { d, curve, i };
    }
  }
  if (!best || best.d > HOVER_RADIUS) {
    hover.setAttribute("visibility", "hidden");
    tip.style.display = "none";
    return;
  }
  const { curve, i } = best;
  hover.setAttribute("cx", sx(curve.x[i]));
  hover.setAttribute("cy", sy(curve.y[i]));
  hover.setAttribute("stroke", curve.colour);
  hover.setAttribute("visibility", "visible");
  tip.textContent = `${curve.label}\n${spec.x_name} ${curve.x[i].toFixed(3)}\n${spec.y_name} ${curve.y[i].toFixed(3)}\n`
    + `threshold ${curve.threshold[i].toFixed(3)}`;
  const boxRect = box.getBoundingClientRect();
  tip.style.left = `${Math.min(event.clientX - boxRect.left + 12, boxRect.width - 170)}px`;
  tip.style.top = `${event.clientY - boxRect.top + 12}px`;
  tip.style.display = "block";
}

function drawMarkers(panel, markers, xKey, yKey) {
  panel.markers.replaceChildren();
  panel.markerLegend.replaceChildren();
  markers.forEach((m, i) => {
    const x = m[xKey], y = m[yKey];
    if (x === null || y === null || !Number.isFinite(x) || !Number.isFinite(y)) return;
    // Each later set's star a little smaller, so that sets at the same point stay visible one inside the other.
    const size = Math.max(5, 12 - 2.5 * i);
    const point = svg("polygon", { points: star(sx(x), sy(y), size), fill: m.colour, class: "marker" }, panel.markers);
    svg("title", {}, point).textContent = `${m.name}: ${x.toFixed(3)}, ${y.toFixed(3)}`;
    const item = div("item", panel.markerLegend);
    const icon = svg("svg", { viewBox: "0 0 24 24", width: 16, height: 16 }, item);
    svg("polygon", { points: star(12, 12, 11), fill: m.colour, class: "marker" }, icon);
    item.appendChild(document.createTextNode(m.name));
  });
}

// Counts as a 2x2 table, shaded by count; class names are the set's own.
function drawMatrices(parent, matrices) {
  parent.replaceChildren();
  for (const m of matrices) {
    const box = div("matrix", parent);
    div("title", box, m.title);
    const table = document.createElement("table");
    box.appendChild(table);
    const head = table.insertRow();
    head.insertCell().textContent = "true \\ predicted";
    for (const name of m.classes) head.insertCell().textContent = name;
    const most = Math.max(1, ...m.counts.flat());
    m.counts.forEach((row, r) => {
      const tr = table.insertRow();
      tr.insertCell().textContent = m.classes[r];
      row.forEach((count, c) => {
        const cell = tr.insertCell();
        cell.className = "count";
        cell.textContent = String(count);
        const share = count / most;
        cell.style.background = `rgba(8, 81, 156, ${(0.08 + 0.82 * share).toFixed(3)})`;
        cell.style.color = share > 0.5 ? "#ffffff" : "inherit";
        cell.title = `true ${m.classes[r]}, predicted ${m.classes[c]}: ${count} images`;
      });
    });
  }
}

export default function (component) {
  const { data, parentElement } = component;
  let state = STATE.get(parentElement);
  if (!state || state.curvesKey !== data.curves_key) {
    parentElement.querySelector(".operating-view")?.remove();
    const root = div("operating-view", parentElement);
    const charts = div("charts", root);
    state = {
      curvesKey: data.curves_key,
      roc: data.roc ? buildPanel(charts, data.roc) : null,
      pr: data.pr ? buildPanel(charts, data.pr) : null,
      matrices: div("matrices", root),
    };
    STATE.set(parentElement, state);
  }
  if (state.roc) drawMarkers(state.roc, data.markers, "fpr", "tpr");
  if (state.pr) drawMarkers(state.pr, data.markers, "recall", "precision");
  drawMatrices(state.matrices, data.matrices);
}
