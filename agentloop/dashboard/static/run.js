// The run view: draws the learning curves with Chart.js from api/run, and keeps the page live by polling
// api/version; when the store changed, it redraws the charts and swaps in the tables from fragments/run
// (rendered and escaped by the server, parsed with DOMParser: no string of agent output reaches innerHTML).
"use strict";

(function () {
  const POLL_MS = 2000;
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  const charts = {};
  const body = document.getElementById("run-body");
  // The page names its data's URLs (they carry the run's prefix when the dashboard lists several runs).
  const urls = { run: body.dataset.runUrl, fragment: body.dataset.fragmentUrl, version: body.dataset.versionUrl };
  const status = document.getElementById("live-status");

  function alpha(hex, a) {
    const n = parseInt(hex.slice(1), 16);
    return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${a})`;
  }

  function rateDatasets(curve, withBand) {
    const sets = [];
    Object.keys(curve.series).forEach((env, i) => {
      const s = curve.series[env];
      const color = COLORS[i % COLORS.length];
      if (withBand) {
        sets.push({ label: `${env} 95% low`, data: s.low, borderWidth: 0, pointRadius: 0, fill: false, band: true });
        sets.push({
          label: `${env} 95% high`, data: s.high, borderWidth: 0, pointRadius: 0, band: true,
          fill: "-1", backgroundColor: alpha(color, 0.15),
        });
      }
      sets.push({ label: env, data: s.rate, borderColor: color, backgroundColor: color, fill: false, tension: 0 });
    });
    return sets;
  }

  function percentOptions() {
    return {
      responsive: true, maintainAspectRatio: false, animation: false, spanGaps: true,
      scales: { y: { min: 0, max: 1, ticks: { callback: (v) => `${Math.round(v * 100)}%` } } },
      plugins: { legend: { labels: { filter: (item, data) => !data.datasets[item.datasetIndex].band } } },
    };
  }

  function draw(id, config) {
    const canvas = document.getElementById(id);
    if (!canvas) return;
    if (charts[id]) {
      charts[id].data = config.data;
      charts[id].update();
    } else {
      charts[id] = new Chart(canvas, config);
    }
    canvas.dataset.points = String(config.data.datasets.reduce((n, d) => n + d.data.length, 0));
  }

  function drawAll(run) {
    const c = run.curves;
    draw("chart-eval", { type: "line", data: { labels: c.eval.labels, datasets: rateDatasets(c.eval, true) },
      options: percentOptions() });
    draw("chart-explore", { type: "line", data: { labels: c.explore.labels, datasets: rateDatasets(c.explore, false) },
      options: percentOptions() });
    draw("chart-timing", {
      type: "bar",
      data: { labels: c.timing.labels, datasets: [{ label: "seconds", data: c.timing.seconds, backgroundColor: COLORS[0] }] },
      options: { responsive: true, maintainAspectRatio: false, animation: false, plugins: { legend: { display: false } } },
    });
    document.body.dataset.chartsVersion = run.version;
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    return response.json();
  }

  async function refresh(version) {
    const [run, html] = await Promise.all([
      getJSON(urls.run),
      fetch(urls.fragment, { credentials: "same-origin", cache: "no-store" }).then((r) => r.text()),
    ]);
    drawAll(run);
    const parsed = new DOMParser().parseFromString(html, "text/html");
    body.replaceChildren(...parsed.body.childNodes);
    body.dataset.version = version;
  }

  async function poll() {
    try {
      const { version } = await getJSON(urls.version);
      if (version !== body.dataset.version) await refresh(version);
      status.textContent = `live: checked ${new Date().toLocaleTimeString()}`;
      status.classList.remove("error");
    } catch (e) {
      status.textContent = `live: ${e.message}`;
      status.classList.add("error");
    }
    setTimeout(poll, POLL_MS);
  }

  getJSON(urls.run).then(drawAll).catch((e) => { status.textContent = `charts: ${e.message}`; });
  setTimeout(poll, POLL_MS);
})();
