// clipsift leaderboard pages: sortable tables and plotly charts. Data comes from
// <script type="application/json"> blocks (never executed); every label given to plotly is escaped.
"use strict";

function escapeText(value) {
  return String(value).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

function cellValue(row, index, numeric) {
  const raw = row.cells[index].dataset.value ?? row.cells[index].textContent;
  if (!numeric) return raw.toLowerCase();
  return raw === "" ? null : parseFloat(raw);
}

function sortTable(table, header) {
  const index = header.cellIndex;
  const numeric = header.dataset.type === "number";
  const current = header.getAttribute("aria-sort");
  const descending = current ? current === "ascending" : numeric; // numbers: best (largest) first
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = cellValue(a, index, numeric), y = cellValue(b, index, numeric);
    if (x === y) return 0;
    if (x === null) return 1; // missing values last, either way
    if (y === null) return -1;
    return (x < y ? -1 : 1) * (descending ? -1 : 1);
  });
  rows.forEach((row) => body.appendChild(row));
  table.querySelectorAll("th").forEach((th) => th.removeAttribute("aria-sort"));
  header.setAttribute("aria-sort", descending ? "descending" : "ascending");
}

function readData(id) {
  const element = document.getElementById(id);
  return element ? JSON.parse(element.textContent) : null;
}

function boardCharts(data) {
  const select = document.getElementById("scatter-x");
  const groups = data.groups;
  const series = {};
  data.points.forEach((p) => {
    const name = `${p.scale} · ${p.track}`;
    (series[name] = series[name] || []).push(p);
  });
  const traces = (x) => Object.entries(series).map(([name, points]) => ({
    type: "scatter", mode: "markers", name: escapeText(name),
    x: points.map(x), y: points.map((p) => 100 * p.average),
    text: points.map((p) => escapeText(p.method)), customdata: points.map((p) => p.url),
    hovertemplate: "%{text}<br>x %{x:.4g}<br>average %{y:.2f}<extra>%{fullData.name}</extra>",
    marker: { size: 10 },
  }));
  const follow = (element) => element.on("plotly_click", (event) => { window.location.href = event.points[0].customdata; });
  const draw = () => {
    const tag = select.value.slice("group:".length);
    const x = (p) => (p.groups[tag] === null || p.groups[tag] === undefined ? null : 100 * p.groups[tag]);
    Plotly.react("scatter", traces(x), {
      title: { text: `average vs ${escapeText(groups[tag] || tag)}` }, xaxis: { title: { text: escapeText(groups[tag] || tag) } },
      yaxis: { title: { text: "average" } }, margin: { t: 40 },
    }, { displaylogo: false, responsive: true }).then(follow);
  };
  if (select.options.length) {
    select.addEventListener("change", draw);
    draw();
  }
  Plotly.newPlot("scatter-size", traces((p) => p.subset_size), {
    title: { text: "average vs subset size" }, xaxis: { title: { text: "subset size (uids)" }, type: "log" },
    yaxis: { title: { text: "average" } }, margin: { t: 40 },
  }, { displaylogo: false, responsive: true }).then(follow);
}

function submissionChart(data) {
  const tasks = data.tasks.slice().reverse();
  const labels = tasks.map((t) => escapeText(t.task));
  Plotly.newPlot("tasks-chart", [
    { type: "bar", orientation: "h", name: "main metric", y: labels, x: tasks.map((t) => 100 * t.value),
      text: tasks.map((t) => escapeText(t.metric)), hovertemplate: "%{y}: %{x:.2f} (%{text})<extra></extra>", textposition: "none" },
    { type: "scatter", mode: "markers", name: "chance", y: labels, x: tasks.map((t) => (t.chance === null ? null : 100 * t.chance)),
      marker: { symbol: "line-ns-open", size: 14, color: "#c0392b" }, hovertemplate: "chance %{x:.2f}<extra></extra>" },
  ], {
    xaxis: { title: { text: "score (%)" }, range: [0, 100] }, margin: { l: 200, t: 20 }, showlegend: true,
    shapes: [{ type: "line", x0: 100 * data.average, x1: 100 * data.average, yref: "paper", y0: 0, y1: 1, line: { dash: "dot" } }],
  }, { displaylogo: false, responsive: true });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("table.sortable").forEach((table) => {
    table.querySelectorAll("th").forEach((header) => header.addEventListener("click", () => sortTable(table, header)));
  });
  if (typeof Plotly === "undefined") return;
  const board = readData("board-data");
  if (board && document.getElementById("scatter")) boardCharts(board);
  const submission = readData("submission-data");
  if (submission) submissionChart(submission);
});
