// The data map: a 2-D canvas scatter of the pairs, coloured by source / topic / subtopic /
// decision, with hover text, search, legend filters, zoom and pan. Plain canvas 2D on purpose:
// it draws 10^5 points without WebGL (absent in GPU-less and headless browsers) and without
// any file from the network.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("datamap-data").textContent);
  const N = D.x.length;
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#17becf", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#9edae5", "#dbdb8d", "#393b79", "#637939", "#8c6d31", "#843c39",
    "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#fd8d3c"];
  const canvas = document.getElementById("map");
  const ctx = canvas.getContext("2d");
  const tip = document.getElementById("tip");
  const legend = document.getElementById("legend");
  const statusEl = document.getElementById("status");
  const colorSel = document.getElementById("colorby");
  const search = document.getElementById("search");
  const showKept = document.getElementById("show-kept");
  const showDropped = document.getElementById("show-dropped");

  const hidden = {}; // colour mode -> Set of hidden category codes
  Object.keys(D.cats).forEach((k) => { hidden[k] = new Set(); });
  let mode = D.default_color in D.cats ? D.default_color : Object.keys(D.cats)[0];
  let match = null; // Uint8Array of search matches, or null when no search
  let haystack = null;
  let view = { s: 1, tx: 0, ty: 0 };
  let visible = new Uint8Array(N);
  let hover = -1;

  function colourOf(code) { return code < 0 ? "#bbbbbb" : PALETTE[code % PALETTE.length]; }

  function fit() {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < N; i++) {
      x0 = Math.min(x0, D.x[i]); x1 = Math.max(x1, D.x[i]);
      y0 = Math.min(y0, D.y[i]); y1 = Math.max(y1, D.y[i]);
    }
    if (!isFinite(x0)) { x0 = y0 = -1; x1 = y1 = 1; }
    const w = canvas.clientWidth, h = canvas.clientHeight, pad = 20;
    const s = Math.min((w - 2 * pad) / Math.max(x1 - x0, 1e-9), (h - 2 * pad) / Math.max(y1 - y0, 1e-9));
    view = { s: s, tx: pad + ((w - 2 * pad) - s * (x1 - x0)) / 2 - s * x0, ty: pad + ((h - 2 * pad) - s * (y1 - y0)) / 2 + s * y1 };
  }
  const sx = (i) => view.s * D.x[i] + view.tx;
  const sy = (i) => -view.s * D.y[i] + view.ty;

  function computeVisible() {
    const codes = D.cats[mode].codes, hid = hidden[mode], kept = D.kept;
    let shown = 0;
    for (let i = 0; i < N; i++) {
      const ok = !hid.has(codes[i]) && (kept[i] ? showKept.checked : showDropped.checked);
      visible[i] = ok ? 1 : 0;
      shown += visible[i];
    }
    return shown;
  }

  function draw() {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, w, h);
    const codes = D.cats[mode].codes;
    const shown = computeVisible();
    const r = Math.max(1.5, Math.min(4, 2 + Math.log10(view.s / 10 + 1)));
    let drawn = 0, matched = 0;
    // two passes when searching: the misses faint first, then the matches on top
    for (const pass of match ? [0, 1] : [1]) {
      ctx.globalAlpha = pass === 0 ? 0.12 : 0.8;
      const byColour = {};
      for (let i = 0; i < N; i++) {
        if (!visible[i]) continue;
        if (match && (match[i] ? 1 : 0) !== pass) continue;
        const c = colourOf(codes[i]);
        (byColour[c] = byColour[c] || []).push(i);
      }
      for (const c in byColour) {
        ctx.fillStyle = c;
        ctx.beginPath();
        for (const i of byColour[c]) {
          const x = sx(i), y = sy(i);
          if (x < -5 || y < -5 || x > w + 5 || y > h + 5) continue;
          ctx.moveTo(x + r, y);
          ctx.arc(x, y, r, 0, 2 * Math.PI);
          drawn++;
          if (match && pass === 1) matched++;
        }
        ctx.fill();
      }
    }
    ctx.globalAlpha = 1;
    if (hover >= 0) {
      ctx.strokeStyle = "#000"; ctx.lineWidth = 1.5;
      ctx.beginPath(); ctx.arc(sx(hover), sy(hover), r + 3, 0, 2 * Math.PI); ctx.stroke();
    }
    statusEl.textContent = `${shown.toLocaleString()} of ${N.toLocaleString()} pairs shown` +
      (match ? ` · ${match.reduce((a, b) => a + b, 0).toLocaleString()} match “${search.value}”` : "");
    window.__datamap = { points: N, shown: shown, drawn: drawn, matched: matched, mode: mode };
  }

  function buildLegend() {
    const cat = D.cats[mode];
    const counts = new Array(cat.names.length).fill(0);
    for (const c of cat.codes) if (c >= 0) counts[c]++;
    legend.innerHTML = "";
    cat.names.forEach((name, code) => {
      const row = document.createElement("div");
      row.className = "item" + (hidden[mode].has(code) ? " off" : "");
      row.title = "click to hide or show";
      const sw = document.createElement("span");
      sw.className = "swatch"; sw.style.background = colourOf(code);
      const label = document.createElement("span");
      label.textContent = `${name} (${counts[code].toLocaleString()})`;
      row.append(sw, label);
      row.addEventListener("click", () => {
        if (hidden[mode].has(code)) hidden[mode].delete(code); else hidden[mode].add(code);
        buildLegend(); draw();
      });
      legend.append(row);
    });
  }

  function nearest(mx, my) {
    let best = -1, bd = 64; // within 8 px
    for (let i = 0; i < N; i++) {
      if (!visible[i]) continue;
      const dx = sx(i) - mx, dy = sy(i) - my, d = dx * dx + dy * dy;
      if (d < bd) { bd = d; best = i; }
    }
    return best;
  }

  function showTip(i, mx, my) {
    if (i < 0) { tip.style.display = "none"; return; }
    const parts = [];
    for (const k of Object.keys(D.cats)) {
      const code = D.cats[k].codes[i];
      if (code >= 0) parts.push(`<b>${k}</b> ${escapeHtml(D.cats[k].names[code])}`);
    }
    if (D.rule[i]) parts.push(`<b>rule</b> ${escapeHtml(D.rule[i])}`);
    tip.innerHTML = `<div class="meta">${parts.join(" · ")}</div>` +
      `<div class="p"><b>prompt</b> ${escapeHtml(D.prompt[i])}</div>` +
      `<div class="r"><b>response</b> ${escapeHtml(D.response[i])}</div>`;
    tip.style.display = "block";
    const box = canvas.getBoundingClientRect();
    const left = Math.min(mx + 14, box.width - tip.offsetWidth - 4);
    const top = my + 14 + tip.offsetHeight > box.height ? my - tip.offsetHeight - 10 : my + 14;
    tip.style.left = `${box.left + Math.max(4, left)}px`;
    tip.style.top = `${box.top + Math.max(4, top)}px`;
  }

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  // --- interaction ---------------------------------------------------------------------------
  Object.keys(D.cats).forEach((k) => {
    const o = document.createElement("option");
    o.value = k; o.textContent = k; if (k === mode) o.selected = true;
    colorSel.append(o);
  });
  colorSel.addEventListener("change", () => { mode = colorSel.value; buildLegend(); draw(); });
  showKept.addEventListener("change", draw);
  showDropped.addEventListener("change", draw);
  search.addEventListener("input", () => {
    const q = search.value.trim().toLowerCase();
    if (!q) { match = null; draw(); return; }
    if (!haystack) haystack = D.prompt.map((p, i) => (p + "\n" + D.response[i]).toLowerCase());
    match = new Uint8Array(N);
    for (let i = 0; i < N; i++) match[i] = haystack[i].includes(q) ? 1 : 0;
    draw();
  });
  let drag = null;
  canvas.addEventListener("mousedown", (e) => { drag = { x: e.clientX, y: e.clientY, tx: view.tx, ty: view.ty }; });
  window.addEventListener("mouseup", () => { drag = null; });
  canvas.addEventListener("mousemove", (e) => {
    const box = canvas.getBoundingClientRect();
    const mx = e.clientX - box.left, my = e.clientY - box.top;
    if (drag) {
      view.tx = drag.tx + e.clientX - drag.x; view.ty = drag.ty + e.clientY - drag.y;
      tip.style.display = "none"; draw(); return;
    }
    const i = nearest(mx, my);
    if (i !== hover) { hover = i; draw(); }
    showTip(i, mx, my);
  });
  canvas.addEventListener("mouseleave", () => { hover = -1; tip.style.display = "none"; draw(); });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const box = canvas.getBoundingClientRect();
    const mx = e.clientX - box.left, my = e.clientY - box.top;
    const f = Math.exp(-e.deltaY * 0.0015);
    view.tx = mx - f * (mx - view.tx); view.ty = my - f * (my - view.ty); view.s *= f;
    draw();
  }, { passive: false });
  canvas.addEventListener("dblclick", () => { fit(); draw(); });
  window.addEventListener("resize", () => { fit(); draw(); });

  fit();
  buildLegend();
  draw();
})();
