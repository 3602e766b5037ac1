// meetara dashboard: live pages. A page whose <main> names an event stream (data-events) swaps in each
// fragment the server pushes ("update"); "gone" means the run no longer exists. No library, no network
// but this server.
(function () {
  "use strict";
  var main = document.getElementById("main");
  var mark = document.getElementById("live-state");
  if (!main || !main.dataset.events || !window.EventSource) {
    return;
  }
  function show(state) {
    if (mark) {
      mark.textContent = state;
      mark.className = "live-state " + state;
    }
  }
  var source = new EventSource(main.dataset.events);
  source.addEventListener("open", function () { show("live"); });
  source.addEventListener("error", function () { show("reconnecting"); });
  source.addEventListener("update", function (e) {
    main.innerHTML = e.data;
    main.dataset.updates = String(Number(main.dataset.updates || 0) + 1);
  });
  source.addEventListener("gone", function (e) {
    source.close();
    show("gone");
    var p = document.createElement("p");
    p.className = "bad";
    p.textContent = e.data;
    main.prepend(p);
  });
})();
