// The members' usage page: asks for a key (kept in this tab's session storage only, sent in the
// Authorization header, never in a URL), fetches GET /usage and draws it.
(function () {
  "use strict";
  var KEY = "openai-api-route.usage.key";
  var $ = function (id) { return document.getElementById(id); };
  var fmt = function (n) { return Number(n || 0).toLocaleString("en-US"); };

  function show(message) {
    var m = $("message");
    m.textContent = message;
    m.hidden = !message;
  }

  function gauge(name, used, limit) {
    var div = document.createElement("div");
    div.className = "gauge";
    var share = limit ? Math.min(1, used / limit) : 0;
    var meter = "meter" + (share >= 1 ? " full" : share >= 0.8 ? " high" : "");
    div.innerHTML = '<div class="name"></div><div class="value"></div><div class="' + meter +
      '"><span></span></div>';
    div.querySelector(".name").textContent = name;
    div.querySelector(".value").textContent = limit ? fmt(used) + " / " + fmt(limit) : fmt(used) + " (no limit)";
    div.querySelector("span").style.width = (share * 100).toFixed(1) + "%";
    return div;
  }

  function draw(u) {
    $("who").textContent = u.member;
    var g = $("gauges");
    g.textContent = "";
    g.appendChild(gauge("Requests, last minute", u.now.requests_last_minute, u.limits.rpm));
    g.appendChild(gauge("Tokens, last minute", u.now.tokens_last_minute, u.limits.tpm));
    g.appendChild(gauge("Tokens today (UTC)", u.now.tokens_today, u.limits.tokens_per_day));
    g.appendChild(gauge("In flight", u.now.in_flight, u.limits.concurrent));

    var perDay = {}, perModel = {};
    u.days.forEach(function (d) {
      perDay[d.date] = (perDay[d.date] || 0) + d.input_tokens + d.output_tokens;
      var k = d.model || "(none)";
      var m = perModel[k] || (perModel[k] = { requests: 0, failed: 0, input: 0, output: 0 });
      m.requests += d.requests; m.failed += d.failed; m.input += d.input_tokens; m.output += d.output_tokens;
    });
    var bars = $("bars");
    bars.textContent = "";
    var dates = Object.keys(perDay).sort();
    var max = Math.max.apply(null, [1].concat(dates.map(function (d) { return perDay[d]; })));
    if (!dates.length) {
      bars.innerHTML = '<p class="empty">No recorded requests in this period.</p>';
    }
    dates.forEach(function (d) {
      var b = document.createElement("div");
      b.className = "bar";
      b.style.height = Math.max(2, (perDay[d] / max) * 100) + "%";
      b.title = d + ": " + fmt(perDay[d]) + " tokens";
      bars.appendChild(b);
    });
    var axis = bars.nextElementSibling;
    if (!axis || axis.className !== "axis") {
      axis = document.createElement("div");
      axis.className = "axis";
      bars.parentNode.insertBefore(axis, bars.nextSibling);
    }
    axis.innerHTML = "<span></span><span></span>";
    axis.firstChild.textContent = dates[0] || "";
    axis.lastChild.textContent = dates[dates.length - 1] || "";

    var body = $("models").querySelector("tbody");
    body.textContent = "";
    Object.keys(perModel).sort().forEach(function (k) {
      var m = perModel[k], tr = document.createElement("tr");
      [k, fmt(m.requests), fmt(m.failed), fmt(m.input), fmt(m.output)].forEach(function (v) {
        var td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    $("data").hidden = false;
  }

  function load() {
    var key = sessionStorage.getItem(KEY);
    if (!key) { $("data").hidden = true; return; }
    var member = $("member").value.trim();
    var url = "/usage?days=30" + (member ? "&member=" + encodeURIComponent(member) : "");
    show("");
    fetch(url, { headers: { "Authorization": "Bearer " + key, "Accept": "application/json" }, cache: "no-store", referrerPolicy: "no-referrer" })
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (body) { return { status: r.status, body: body }; });
      })
      .then(function (res) {
        if (res.status === 200) { draw(res.body); return; }
        $("data").hidden = true;
        var why = (res.body && res.body.error && res.body.error.message) || "";
        if (res.status === 401) {
          sessionStorage.removeItem(KEY);
          show("That key was not accepted (401). Check it and try again.");
        } else {
          show("The gateway answered " + res.status + (why ? ": " + why : "."));
        }
      })
      .catch(function () { show("The gateway could not be reached."); });
  }

  $("key-form").addEventListener("submit", function (e) {
    e.preventDefault();
    var key = $("key").value.trim();
    if (!key) { show("Enter your key."); return; }
    sessionStorage.setItem(KEY, key);
    $("key").value = "";
    load();
  });
  $("forget").addEventListener("click", function () {
    sessionStorage.removeItem(KEY);
    $("data").hidden = true;
    show("");
  });
  load();
})();
