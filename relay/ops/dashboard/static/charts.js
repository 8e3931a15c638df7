// Draws each <div data-chart="ID"> with uPlot from the JSON in <script id="ID">.
// Without JavaScript the page's table shows the same numbers (progressive enhancement).
(function () {
  "use strict";
  var colours = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2"];
  function draw(box) {
    var source = document.getElementById(box.getAttribute("data-chart"));
    if (!source || typeof uPlot === "undefined") { return; }
    var data = JSON.parse(source.textContent);
    var names = Object.keys(data.series);
    var series = [{}].concat(names.map(function (name, i) {
      return { label: name, stroke: colours[i % colours.length], width: 2, points: { show: data.x.length < 8 } };
    }));
    var columns = [data.x].concat(names.map(function (name) { return data.series[name]; }));
    var width = Math.max(320, box.clientWidth || 800);
    new uPlot({ width: width, height: 260, series: series, scales: { x: { time: true } } }, columns, box);
    box.setAttribute("data-drawn", "true");
  }
  document.querySelectorAll("[data-chart]").forEach(draw);
})();
