(function () {
  "use strict";
  // Progressive enhancement only: hovering or focusing a node dims the edges that do not
  // touch it. The page is complete without this script.
  var map = document.getElementById("flowmap");
  var edges = map ? map.querySelectorAll("[data-edge]") : [];
  var nodes = map ? map.querySelectorAll("[data-node]") : [];
  function touches(edge, key) {
    var d = edge.dataset;
    return "workload:" + d.source === key ||
      (d.destination !== "" && "workload:" + d.destination === key) ||
      (d.service !== "" && "service:/" + d.service === key);
  }
  function highlight(key) {
    var i;
    for (i = 0; i < edges.length; i++) {
      edges[i].classList.toggle("dim", key !== null && !touches(edges[i], key));
    }
    for (i = 0; i < nodes.length; i++) {
      nodes[i].classList.toggle("active", nodes[i].dataset.node === key);
    }
  }
  function on(node) {
    var key = node.dataset.node;
    node.addEventListener("mouseenter", function () { highlight(key); });
    node.addEventListener("focus", function () { highlight(key); });
    node.addEventListener("mouseleave", function () { highlight(null); });
    node.addEventListener("blur", function () { highlight(null); });
  }
  for (var i = 0; i < nodes.length; i++) {
    on(nodes[i]);
  }
  document.body.dataset.ready = "1";
  document.body.dataset.edges = String(edges.length);
})();
