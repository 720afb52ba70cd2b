// The members' usage page: asks for a key (kept in this tab's session storage only, sent in the
// Authorization header, never in a URL, a cookie or local storage), fetches GET /usage and draws
// it: each limit as a gauge, tokens per day as bars, a table per model.
(function () {
  "use strict";
  var KEY = "openai-api-route.usage.key";
  var DAY = 86400000;
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
    var level = share >= 1 ? " full" : share >= 0.8 ? " high" : "";
    div.innerHTML = '<div class="name"></div><div class="value"><b></b><span></span></div>' +
      '<div class="meter' + level + '" role="meter" aria-valuemin="0"><span></span></div>';
    div.querySelector(".name").textContent = name;
    div.querySelector(".value b").textContent = fmt(used);
    div.querySelector(".value span").textContent = limit ? " / " + fmt(limit) : " · no limit";
    var meter = div.querySelector(".meter");
    meter.setAttribute("aria-valuenow", String(used));
    if (limit) { meter.setAttribute("aria-valuemax", String(limit)); } else { meter.className += " none"; }
    var fill = meter.querySelector("span");
    fill.style.width = (share * 100).toFixed(1) + "%";
    if (!used) { fill.style.minWidth = "0"; }
    return div;
  }

  // Every UTC date of the last `n` days, oldest first (a day without records gets a bar of 0).
  function lastDays(n) {
    var out = [], today = Math.floor(Date.now() / DAY) * DAY;
    for (var i = n - 1; i >= 0; i--) { out.push(new Date(today - i * DAY).toISOString().slice(0, 10)); }
    return out;
  }

  function bars(u, n) {
    var perDay = {};
    u.days.forEach(function (d) {
      var p = perDay[d.date] || (perDay[d.date] = { input: 0, output: 0 });
      p.input += d.input_tokens; p.output += d.output_tokens;
    });
    var dates = lastDays(n);
    var max = 1, total = 0;
    dates.forEach(function (d) {
      var p = perDay[d];
      if (p) { max = Math.max(max, p.input + p.output); total += p.input + p.output; }
    });
    var box = $("bars");
    box.textContent = "";
    dates.forEach(function (d) {
      var p = perDay[d] || { input: 0, output: 0 };
      var bar = document.createElement("div");
      bar.className = "bar";
      bar.title = d + ": " + fmt(p.input) + " input + " + fmt(p.output) + " output tokens";
      var out = document.createElement("span");
      out.className = "output";
      out.style.height = (p.output / max * 100) + "%";
      var inp = document.createElement("span");
      inp.className = "input";
      inp.style.height = (p.input / max * 100) + "%";
      bar.appendChild(out);
      bar.appendChild(inp);
      box.appendChild(bar);
    });
    $("scale-max").textContent = fmt(max === 1 && !total ? 0 : max);
    var axis = $("axis");
    axis.firstChild.textContent = dates[0];
    axis.lastChild.textContent = dates[dates.length - 1];
    $("total").textContent = fmt(total) + " tokens in the last " + n + " days" +
      (total ? "" : " (no recorded requests)");
  }

  function table(u) {
    var perModel = {};
    u.days.forEach(function (d) {
      var k = d.model || "(none)";
      var m = perModel[k] || (perModel[k] = { requests: 0, failed: 0, input: 0, output: 0 });
      m.requests += d.requests; m.failed += d.failed; m.input += d.input_tokens; m.output += d.output_tokens;
    });
    var body = $("models").querySelector("tbody");
    body.textContent = "";
    var names = Object.keys(perModel).sort();
    if (!names.length) {
      var tr = document.createElement("tr"), td = document.createElement("td");
      td.colSpan = 5; td.className = "muted"; td.textContent = "No recorded requests in this period.";
      tr.appendChild(td); body.appendChild(tr);
    }
    names.forEach(function (k) {
      var m = perModel[k], tr = document.createElement("tr");
      [k, fmt(m.requests), fmt(m.failed), fmt(m.input), fmt(m.output)].forEach(function (v) {
        var td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  function draw(u, n) {
    $("who").textContent = u.member;
    var g = $("gauges");
    g.textContent = "";
    g.appendChild(gauge("Requests, last minute", u.now.requests_last_minute, u.limits.rpm));
    g.appendChild(gauge("Tokens, last minute", u.now.tokens_last_minute, u.limits.tpm));
    g.appendChild(gauge("Tokens today (UTC)", u.now.tokens_today, u.limits.tokens_per_day));
    g.appendChild(gauge("In flight", u.now.in_flight, u.limits.concurrent));
    bars(u, n);
    table(u);
    $("data").hidden = false;
    $("ask").hidden = true;
  }

  // No key, or a key that was not accepted: the form again.
  function ask() {
    $("data").hidden = true;
    $("ask").hidden = false;
  }

  function load() {
    var key = sessionStorage.getItem(KEY);
    if (!key) { ask(); return; }
    var member = $("member").value.trim();
    var n = Number($("days").value) || 30;
    // Only the period and an admin's member name go into the URL; the key goes in a header.
    var url = "/usage?days=" + n + (member ? "&member=" + encodeURIComponent(member) : "");
    show("");
    fetch(url, {
      headers: { "Authorization": "Bearer " + key, "Accept": "application/json" },
      cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer"
    })
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (body) { return { status: r.status, body: body }; });
      })
      .then(function (res) {
        if (res.status === 200) { draw(res.body, n); return; }
        var why = (res.body && res.body.error && res.body.error.message) || "";
        if (res.status === 401) {
          sessionStorage.removeItem(KEY);
          ask();
          show("That key was not accepted: it is not the key of any member of this gateway. Check it and try again.");
        } else if (res.status === 403) {
          show("Only an admin member may read another member's usage.");
        } else if (res.status === 404 && member) {
          show("There is no member named " + member + ".");
        } else {
          show("The gateway answered " + res.status + (why ? ": " + why : "."));
        }
      })
      .catch(function () { show("The gateway could not be reached."); });
  }

  $("key-form").addEventListener("submit", function (e) {
    e.preventDefault();
    var key = $("key").value.trim();
    $("key").value = "";
    if (!key) { show("Enter your key."); return; }
    sessionStorage.setItem(KEY, key);
    load();
  });
  $("member-form").addEventListener("submit", function (e) { e.preventDefault(); load(); });
  $("days").addEventListener("change", load);
  $("refresh").addEventListener("click", load);
  $("forget").addEventListener("click", function () {
    sessionStorage.removeItem(KEY);
    $("member").value = "";
    show("");
    ask();
  });
  load();
})();
