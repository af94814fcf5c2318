"use strict";
// attnkit report: reads the JSON block written by attnkit.viz.report and draws it.
// Every string from the input is written with textContent, never as HTML.
(async () => {
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  };
  const D = JSON.parse($("attnkit-data").textContent);
  const N = D.layers, H = D.heads, L = D.length, P = D.map.size, K = D.links.k;
  const edges = D.map.edges; // null: full maps (P == L); else P + 1 token boundaries
  const tokens = D.tokens;

  // ---- data: base64 -> deflate -> typed arrays ------------------------------------------
  async function unpack(b64) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  if (typeof DecompressionStream === "undefined") {
    $("notes").appendChild(el("li", "", "This browser lacks DecompressionStream; open the report in a current Chromium, Firefox or Safari."));
    return;
  }
  const maps = await unpack(D.map.data); // (N, H, P, P) uint8 = round(255 * sqrt(w / peak))
  const indexBytes = await unpack(D.links.index);
  const linkIndex = D.links.index_bytes === 2 ? new Uint16Array(indexBytes.buffer) : new Uint32Array(indexBytes.buffer);
  const linkWeight = new Uint16Array((await unpack(D.links.weight)).buffer); // (N, H, L, K) round(65535 * w)
  const mapOffset = (l, h) => (l * H + h) * P * P;
  const linkOffset = (l, h, i) => ((l * H + h) * L + i) * K;

  // ---- colour ---------------------------------------------------------------------------
  // viridis (matplotlib, van der Walt & Smith), 11 anchors, linearly interpolated to 256 entries
  const anchors = [[68, 1, 84], [72, 35, 116], [64, 67, 135], [52, 94, 141], [41, 120, 142], [32, 144, 140],
    [34, 167, 132], [68, 190, 112], [121, 209, 81], [189, 222, 38], [253, 231, 37]];
  const lut = new Uint8Array(256 * 3);
  for (let v = 0; v < 256; v++) {
    const x = (v / 255) * 10, a = Math.min(9, Math.floor(x)), f = x - a;
    for (let c = 0; c < 3; c++) lut[v * 3 + c] = Math.round(anchors[a][c] * (1 - f) + anchors[a + 1][c] * f);
  }
  function headImage(l, h) {
    const canvas = document.createElement("canvas");
    canvas.width = P;
    canvas.height = P;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(P, P);
    const base = mapOffset(l, h);
    for (let p = 0; p < P * P; p++) {
      const v = maps[base + p];
      image.data[4 * p] = lut[3 * v];
      image.data[4 * p + 1] = lut[3 * v + 1];
      image.data[4 * p + 2] = lut[3 * v + 2];
      image.data[4 * p + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
    return canvas;
  }
  const tileOf = (i) => {
    if (!edges) return i;
    let lo = 0, hi = P - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (edges[mid] <= i) lo = mid; else hi = mid - 1;
    }
    return lo;
  };
  const cellName = (p) => (edges ? `tokens ${edges[p]}–${edges[p + 1] - 1}` : `${p} «${tokens[p]}»`);
  const weightAt = (l, h, r, c) => ((maps[mapOffset(l, h) + r * P + c] / 255) ** 2) * D.map.peak[l][h];

  // ---- header -----------------------------------------------------------------------------
  $("title").textContent = D.title;
  const mode = edges ? `maps pooled to ${P}×${P} tiles` : "full maps";
  $("subtitle").textContent = `${D.model ? D.model + " · " : ""}${L} tokens · ${N} layers × ${H} heads · ${mode}`;
  for (const note of D.notes) $("notes").appendChild(el("li", "", note));

  const roleOf = new Map();
  for (const row of D.roles) roleOf.set(`${row.layer},${row.head}`, row.role);

  // ---- head view ----------------------------------------------------------------------------
  const state = { layer: 0, head: 0, hover: null, pinned: null };
  const layerSelect = $("layer"), headSelect = $("head");
  D.layer_names.forEach((name, l) => layerSelect.appendChild(Object.assign(el("option", "", name), { value: l })));
  for (let h = 0; h < H; h++) headSelect.appendChild(Object.assign(el("option", "", `head ${h}`), { value: h }));

  const textBox = $("text");
  const spans = [];
  function fillTokens(box, list) {
    tokens.forEach((tok, i) => {
      const gap = D.spacing ? D.spacing[i] : i > 0 ? " " : "";
      if (gap === "\n") box.appendChild(document.createElement("br"));
      else if (gap) box.appendChild(document.createTextNode(" "));
      const span = el("span", "tok", tok);
      span.dataset.i = i;
      box.appendChild(span);
      list.push(span);
    });
  }
  fillTokens(textBox, spans);

  const mapCanvas = $("map"), mapCtx = mapCanvas.getContext("2d");
  let baseImage = null;
  let incoming = null; // CSR of "who attends to j" for the current head: start (L+1), from, weight
  function buildIncoming() {
    const counts = new Uint32Array(L + 1);
    const base = linkOffset(state.layer, state.head, 0);
    for (let n = 0; n < L * K; n++) counts[linkIndex[base + n] + 1]++;
    for (let j = 0; j < L; j++) counts[j + 1] += counts[j];
    const fill = counts.slice(0, L), from = new Uint32Array(L * K), weight = new Float32Array(L * K);
    for (let i = 0; i < L; i++) {
      for (let r = 0; r < K; r++) {
        const j = linkIndex[base + i * K + r], slot = fill[j]++;
        from[slot] = i;
        weight[slot] = linkWeight[base + i * K + r] / 65535;
      }
    }
    incoming = { start: counts, from, weight };
  }
  function drawMap() {
    const size = mapCanvas.width;
    mapCtx.imageSmoothingEnabled = false;
    mapCtx.drawImage(baseImage, 0, 0, size, size);
    const focus = state.pinned ?? state.hover;
    if (focus === null) return;
    const cell = size / P, row = tileOf(focus);
    mapCtx.strokeStyle = "rgba(214, 39, 40, 0.95)";
    mapCtx.lineWidth = 1.5;
    mapCtx.strokeRect(0.5, row * cell, size - 1, Math.max(cell, 2));
    const base = linkOffset(state.layer, state.head, focus);
    mapCtx.fillStyle = "rgba(255, 255, 255, 0.95)";
    for (let r = 0; r < K; r++) {
      const col = tileOf(linkIndex[base + r]);
      mapCtx.fillRect(col * cell + cell / 2 - 2, row * cell + cell / 2 - 2, 4, 4);
    }
  }
  function selectHead(l, h) {
    state.layer = l;
    state.head = h;
    layerSelect.value = String(l);
    headSelect.value = String(h);
    baseImage = headImage(l, h);
    buildIncoming();
    drawMap();
    const parts = [roleOf.get(`${l},${h}`) ? `role: ${roleOf.get(`${l},${h}`)}` : ""];
    if (D.entropy) parts.push(`mean entropy ${D.entropy[l][h].toFixed(2)} nats`);
    if (D.mean_distance) parts.push(`mean distance ${D.mean_distance[l][h].toFixed(1)} tokens`);
    $("head-summary").textContent = parts.filter(Boolean).join(" · ");
    $("map-caption").textContent = edges
      ? `Queries down, keys across; each pixel is the mean weight of a tile of ~${Math.round(L / P)} tokens (colour ∝ √(weight / head max)).`
      : "Queries down, keys across (colour ∝ √(weight / head max)).";
    document.querySelectorAll("#grid canvas").forEach((c) => c.classList.toggle("current", c.dataset.l == l && c.dataset.h == h));
    showLinks(state.pinned ?? state.hover);
  }
  let marked = [];
  function clearMarks() {
    for (const s of marked) {
      s.classList.remove("to", "from", "self", "pinned");
      s.style.background = "";
      s.style.boxShadow = "";
    }
    marked = [];
  }
  const describe = (list) => list.sort((a, b) => a[0] - b[0]).map(([j, w]) => `${j} «${tokens[j]}» ${w.toFixed(3)}`).join(" · ");
  function showLinks(i) {
    clearMarks();
    const box = $("links");
    if (i === null || i === undefined) {
      box.textContent = "Hover a token.";
      drawMap();
      return;
    }
    const base = linkOffset(state.layer, state.head, i);
    const out = [];
    for (let r = 0; r < K; r++) out.push([linkIndex[base + r], linkWeight[base + r] / 65535]);
    const top = Math.max(...out.map((x) => x[1]), 1e-9);
    for (const [j, w] of out) {
      const s = spans[j];
      s.classList.add("to");
      s.style.background = `rgba(31, 119, 180, ${(0.15 + 0.75 * w / top).toFixed(3)})`;
      marked.push(s);
    }
    const inc = [];
    for (let n = incoming.start[i]; n < incoming.start[i + 1]; n++) inc.push([incoming.from[n], incoming.weight[n]]);
    inc.sort((a, b) => b[1] - a[1]);
    const strongest = inc.slice(0, 24);
    const topIn = Math.max(...strongest.map((x) => x[1]), 1e-9);
    for (const [j, w] of strongest) {
      const s = spans[j];
      s.classList.add("from");
      s.style.boxShadow = `inset 0 -3px 0 rgba(230, 120, 20, ${(0.25 + 0.75 * w / topIn).toFixed(3)})`;
      marked.push(s);
    }
    spans[i].classList.add(state.pinned === i ? "pinned" : "self");
    marked.push(spans[i]);
    box.replaceChildren(
      el("div", "", `${i} «${tokens[i]}» attends to: ${describe(out)}`),
      el("div", "", inc.length
        ? `attended to by (${inc.length}${inc.length > strongest.length ? ", strongest " + strongest.length + " shown" : ""}): ${describe(strongest.slice(0, 12))}`
        : "no token has it among its strongest keys"),
    );
    drawMap();
  }
  textBox.addEventListener("mouseover", (event) => {
    const i = event.target.dataset ? event.target.dataset.i : undefined;
    if (i === undefined || state.pinned !== null) return;
    state.hover = Number(i);
    showLinks(state.hover);
  });
  textBox.addEventListener("mouseleave", () => {
    state.hover = null;
    if (state.pinned === null) showLinks(null);
  });
  textBox.addEventListener("click", (event) => {
    const i = event.target.dataset ? event.target.dataset.i : undefined;
    if (i === undefined) return;
    state.pinned = state.pinned === Number(i) ? null : Number(i);
    showLinks(state.pinned ?? Number(i));
  });
  layerSelect.addEventListener("change", () => selectHead(Number(layerSelect.value), state.head));
  headSelect.addEventListener("change", () => selectHead(state.layer, Number(headSelect.value)));

  const tooltip = $("tooltip");
  mapCanvas.addEventListener("mousemove", (event) => {
    const rect = mapCanvas.getBoundingClientRect();
    const c = Math.min(P - 1, Math.floor(((event.clientX - rect.left) / rect.width) * P));
    const r = Math.min(P - 1, Math.floor(((event.clientY - rect.top) / rect.height) * P));
    const w = weightAt(state.layer, state.head, r, c);
    const text = `query ${cellName(r)}\nkey   ${cellName(c)}\n${edges ? "mean weight" : "weight"} ≈ ${w.toPrecision(3)}`;
    $("map-readout").textContent = text.replace(/\n/g, " · ");
    tooltip.textContent = text;
    tooltip.hidden = false;
    tooltip.style.left = `${event.clientX + 14}px`;
    tooltip.style.top = `${event.clientY + 14}px`;
  });
  mapCanvas.addEventListener("mouseleave", () => { tooltip.hidden = true; });

  // ---- model view ----------------------------------------------------------------------------
  const grid = $("grid");
  grid.style.gridTemplateColumns = `auto repeat(${H}, 68px)`;
  grid.appendChild(el("div", "label", ""));
  for (let h = 0; h < H; h++) grid.appendChild(el("div", "label", `H${h}`));
  const thumb = Math.min(P, 96);
  for (let l = 0; l < N; l++) {
    grid.appendChild(el("div", "label", D.layer_names[l]));
    for (let h = 0; h < H; h++) {
      const c = document.createElement("canvas");
      c.width = thumb;
      c.height = thumb;
      c.dataset.l = l;
      c.dataset.h = h;
      c.title = `${D.layer_names[l]}, head ${h}${roleOf.get(`${l},${h}`) ? " · " + roleOf.get(`${l},${h}`) : ""}`;
      const ctx = c.getContext("2d");
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(headImage(l, h), 0, 0, thumb, thumb);
      c.addEventListener("click", () => {
        selectHead(l, h);
        $("head-view").scrollIntoView({ behavior: "smooth" });
      });
      grid.appendChild(c);
    }
  }

  // ---- head roles ------------------------------------------------------------------------------
  const rows = [];
  const scoreKeys = [];
  for (let l = 0; l < N; l++) {
    for (let h = 0; h < H; h++) {
      const row = { layer: l, head: h, role: roleOf.get(`${l},${h}`) ?? "" };
      if (D.entropy) row["entropy"] = D.entropy[l][h];
      if (D.mean_distance) row["mean distance"] = D.mean_distance[l][h];
      rows.push(row);
    }
  }
  for (const r of D.roles) {
    const row = rows[r.layer * H + r.head];
    if (!row) continue;
    for (const [key, value] of Object.entries(r.scores ?? {})) {
      if (!scoreKeys.includes(key)) scoreKeys.push(key);
      row[key] = value;
    }
  }
  const columns = ["layer", "head"];
  if (D.roles.length) columns.push("role");
  if (D.entropy) columns.push("entropy");
  if (D.mean_distance) columns.push("mean distance");
  columns.push(...scoreKeys.filter((k) => !columns.includes(k)));
  const table = $("role-table");
  const headRow = el("tr");
  const sort = { key: null, dir: 1 };
  columns.forEach((key) => {
    const th = el("th", key === "role" ? "role" : "", key);
    th.dataset.key = key;
    th.addEventListener("click", () => {
      sort.dir = sort.key === key ? -sort.dir : 1;
      sort.key = key;
      drawRoles();
    });
    headRow.appendChild(th);
  });
  table.tHead.appendChild(headRow);
  const fmt = (v) => (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : v ?? "");
  function drawRoles() {
    const sorted = rows.slice();
    if (sort.key) {
      sorted.sort((a, b) => {
        const x = a[sort.key], y = b[sort.key];
        if (typeof x === "number" && typeof y === "number") return (x - y) * sort.dir;
        return String(x ?? "").localeCompare(String(y ?? "")) * sort.dir;
      });
    }
    table.tBodies[0].replaceChildren(...sorted.map((row) => {
      const tr = el("tr", "clickable");
      for (const key of columns) tr.appendChild(el("td", key === "role" ? "role" : "", fmt(row[key])));
      tr.addEventListener("click", () => {
        selectHead(row.layer, row.head);
        $("head-view").scrollIntoView({ behavior: "smooth" });
      });
      return tr;
    }));
    table.tHead.querySelectorAll("th").forEach((th) => {
      th.textContent = th.dataset.key + (th.dataset.key === sort.key ? (sort.dir > 0 ? " ▲" : " ▼") : "");
    });
  }
  drawRoles();
  for (const [role, text] of Object.entries(D.role_descriptions)) {
    $("role-descriptions").append(el("dt", "", role), el("dd", "", text));
  }

  // ---- saliency ----------------------------------------------------------------------------------
  const methods = Object.keys(D.saliency);
  const salBox = $("saliency-text");
  const salSpans = [];
  if (methods.length) {
    fillTokens(salBox, salSpans);
    const pick = $("saliency-method");
    methods.forEach((m) => pick.appendChild(Object.assign(el("option", "", m), { value: m })));
    const special = new Set(D.special);
    const paint = () => {
      const values = D.saliency[pick.value];
      // Scale to the largest value among ordinary tokens: [CLS]/[SEP] sinks would wash out the rest.
      const ordinary = values.filter((_, i) => !special.has(i)).map(Math.abs);
      const top = Math.max(...(ordinary.length ? ordinary : values.map(Math.abs)), 1e-12);
      values.forEach((v, i) => {
        const alpha = Math.min(1, Math.abs(v) / top);
        salSpans[i].style.background = `rgba(214, 39, 40, ${alpha.toFixed(3)})`;
        salSpans[i].classList.toggle("special", special.has(i));
        salSpans[i].title = `${pick.value}: ${v}`;
      });
    };
    pick.addEventListener("change", paint);
    paint();
  } else {
    salBox.textContent = "No saliency was computed for this report.";
  }
  const faith = $("faithfulness").tBodies[0];
  for (const row of D.faithfulness) {
    faith.appendChild(el("tr")).append(el("td", "role", row.name), el("td", "", fmt(row.value)), el("td", "", row.note ?? ""));
  }
  if (!D.faithfulness.length) $("faithfulness").hidden = true;

  selectHead(0, 0);
  document.body.dataset.ready = "1";
})().catch((err) => {
  document.body.dataset.error = String(err);
  console.error(err);
});
