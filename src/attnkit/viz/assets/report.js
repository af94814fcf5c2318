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

  // ---- sections ----------------------------------------------------------------------------------
  // section_flow: row a, column b = mean attention a token of section a pays to section b, stored per (S, S)
  // matrix as round(255 * sqrt(f / peak of its row)): the mean of all layers and heads, each layer's head average and,
  // within the report's size budget, each layer's single heads (null where left out; `note` says so).
  async function setupSections() {
    const secs = D.sections, SF = D.section_flow, S = secs.length, SS = S * S;
    $("sections").hidden = false;
    $("nav-sections").hidden = false;
    async function decode(entry) { // (count, S, S) codes with a float32 peak per row
      const codes = await unpack(entry.data), peaks = new Float32Array((await unpack(entry.peak)).buffer);
      const out = new Float32Array(codes.length);
      for (let n = 0; n < codes.length; n++) out[n] = (codes[n] / 255) ** 2 * peaks[Math.floor(n / S)];
      return out;
    }
    const cache = new Map();
    const cached = async (key, make) => {
      if (!cache.has(key)) cache.set(key, await make());
      return cache.get(key);
    };
    const meanAll = await decode(SF.mean);
    const allHeadsKept = SF.heads.every(Boolean);
    const headKept = (layer) => (layer === "all" ? allHeadsKept : Boolean(SF.heads[layer]));
    async function flowFor(layer, head) { // (S * S) for a layer or "all", a head or "all"
      if (layer === "all" && head === "all") return meanAll;
      if (head === "all") return cached(`l${layer}`, () => decode(SF.layers[layer]));
      const perHead = (l) => cached(`h${l}`, () => decode(SF.heads[l]));
      if (layer !== "all") return (await perHead(layer)).subarray(head * SS, (head + 1) * SS);
      return cached(`all-h${head}`, async () => { // one head, averaged over the layers here
        const out = new Float32Array(SS);
        for (let l = 0; l < N; l++) {
          const f = await perHead(l);
          for (let n = 0; n < SS; n++) out[n] += f[head * SS + n] / N;
        }
        return out;
      });
    }

    // names, distances, ranking
    const short = (t, n = 38) => (t.length > n ? t.slice(0, n - 1) + "…" : t);
    const labelOf = (a) => secs[a].label || `#${a + 1}`;
    const nameOf = (a) => (secs[a].title ? `${labelOf(a)} “${short(secs[a].title)}”` : labelOf(a));
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    const away = (a, b) => (a === b ? "own section" : b < a ? `${plural(a - b, "section")} back` : `${plural(b - a, "section")} forward`);
    const reachOf = (f) => secs.map((_, a) => { // flow-weighted section distance beyond the neighbours
      let reach = 0, far = 0;
      for (let b = 0; b < S; b++) {
        if (Math.abs(a - b) < 2) continue;
        reach += f[a * S + b] * Math.abs(a - b);
        far += f[a * S + b];
      }
      return { a, reach, far };
    });
    const view = { layer: "all", head: "all", flow: meanAll, reach: reachOf(meanAll), picked: 0, source: 0 };
    const sourcesOf = (a) => {
      const list = [];
      for (let b = 0; b < S; b++) list.push({ b, v: view.flow[a * S + b] });
      return list.sort((x, y) => y.v - x.v || x.b - y.b);
    };
    const strongestOther = (a) => sourcesOf(a).find((x) => x.b !== a && x.v > 0)?.b ?? a;

    // controls
    const layerSel = $("section-layer"), headSel = $("section-head"), pastBox = $("section-past-diagonal");
    layerSel.appendChild(Object.assign(el("option", "", "all layers averaged"), { value: "all" }));
    D.layer_names.forEach((name, l) => layerSel.appendChild(Object.assign(
      el("option", "", SF.layers[l] ? name : `${name} (not kept)`), { value: l, disabled: !SF.layers[l] })));
    headSel.appendChild(Object.assign(el("option", "", "all heads averaged"), { value: "all" }));
    for (let h = 0; h < H; h++) headSel.appendChild(Object.assign(el("option", "", `head ${h}`), { value: h }));
    const syncHeads = () => {
      const kept = headKept(view.layer);
      for (const option of headSel.options) if (option.value !== "all") option.disabled = !kept;
      headSel.title = kept ? "" : "single heads of this layer were left out to keep the report small; see the note above";
    };
    if (SF.causal) $("section-causal").hidden = false;
    if (SF.note) Object.assign($("section-note"), { hidden: false, textContent: SF.note });
    $("section-order-caption").textContent =
      "Reach: Σ flow(a→b) × |a − b| over sections b at least two away, i.e. how many sections a token's " +
      "attention travels on average, counting its own and the neighbouring sections as zero. " +
      "Beside it, the share of attention beyond the neighbours.";

    // heatmap
    const canvas = $("section-map"), ctx = canvas.getContext("2d"), tooltip = $("tooltip");
    const SIZE = 520, M = 48, AREA = SIZE - M - 4, cell = AREA / S, dpr = window.devicePixelRatio || 1;
    canvas.width = SIZE * dpr;
    canvas.height = SIZE * dpr;
    const image = document.createElement("canvas");
    image.width = S;
    image.height = S;
    function paintImage() {
      const f = view.flow;
      let top = 0, topAll = 0;
      for (let a = 0; a < S; a++) {
        for (let b = 0; b < S; b++) {
          topAll = Math.max(topAll, f[a * S + b]);
          if (a !== b) top = Math.max(top, f[a * S + b]);
        }
      }
      const scale = pastBox.checked && top > 0 ? top : topAll || 1;
      const pixels = image.getContext("2d").createImageData(S, S);
      for (let a = 0; a < S; a++) {
        for (let b = 0; b < S; b++) {
          const p = 4 * (a * S + b);
          if (SF.causal && b > a) {
            pixels.data.set([236, 238, 241, 255], p);
          } else {
            const v = Math.round(255 * Math.sqrt(Math.min(1, f[a * S + b] / scale)));
            pixels.data.set([lut[3 * v], lut[3 * v + 1], lut[3 * v + 2], 255], p);
          }
        }
      }
      image.getContext("2d").putImageData(pixels, 0, 0);
      $("section-map-caption").textContent =
        "Rows draw on columns: row a, column b is the mean attention a token of section a pays to section b " +
        `(a row sums to 1). Colour ∝ √(flow / ${pastBox.checked ? "largest flow between two different sections; own-section cells on the diagonal are clipped" : "largest flow"}).` +
        (SF.causal ? " Grey: later sections, which a causal model cannot see." : "");
    }
    function drawMap() {
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.fillStyle = "#fff";
      ctx.fillRect(0, 0, SIZE, SIZE);
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(image, M, M, AREA, AREA);
      ctx.fillStyle = "#5c6370";
      ctx.font = "10px system-ui, sans-serif";
      const step = Math.max(1, Math.ceil(12 / cell));
      for (let a = 0; a < S; a += step) {
        const text = short(labelOf(a), 7), mid = M + (a + 0.5) * cell;
        ctx.textAlign = "right";
        ctx.textBaseline = "middle";
        ctx.fillText(text, M - 4, mid);
        ctx.save();
        ctx.translate(mid, M - 4);
        ctx.rotate(-Math.PI / 2);
        ctx.textAlign = "left";
        ctx.fillText(text, 0, 0);
        ctx.restore();
      }
      const edge = Math.max(cell, 3);
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "rgba(214, 39, 40, 0.95)";
      ctx.strokeRect(M, M + view.picked * cell + cell / 2 - edge / 2, AREA, edge);
      ctx.strokeStyle = "#fff";
      ctx.strokeRect(M + view.source * cell + cell / 2 - edge / 2 - 1.5, M + view.picked * cell + cell / 2 - edge / 2 - 1.5, edge + 3, edge + 3);
    }
    const cellAt = (event) => {
      const rect = canvas.getBoundingClientRect();
      const b = Math.floor(((event.clientX - rect.left) * (SIZE / rect.width) - M) / cell);
      const a = Math.floor(((event.clientY - rect.top) * (SIZE / rect.height) - M) / cell);
      return a >= 0 && a < S && b >= 0 && b < S ? [a, b] : null;
    };
    canvas.addEventListener("mousemove", (event) => {
      const at = cellAt(event);
      if (!at) {
        tooltip.hidden = true;
        return;
      }
      const [a, b] = at;
      const text = `${nameOf(a)}\ndraws on ${nameOf(b)}\nflow ${view.flow[a * S + b].toFixed(3)} · ${away(a, b)}`;
      $("section-readout").textContent = text.replace(/\n/g, " · ");
      tooltip.textContent = text;
      tooltip.hidden = false;
      tooltip.style.left = `${event.clientX + 14}px`;
      tooltip.style.top = `${event.clientY + 14}px`;
    });
    canvas.addEventListener("mouseleave", () => { tooltip.hidden = true; });
    canvas.addEventListener("click", (event) => {
      const at = cellAt(event);
      if (at) pick(at[0], at[1]);
    });
    canvas.addEventListener("keydown", (event) => {
      const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
      const move = moves[event.key];
      if (!move) return;
      event.preventDefault();
      const a = Math.min(S - 1, Math.max(0, view.picked + move[0]));
      pick(a, move[1] ? Math.min(S - 1, Math.max(0, view.source + move[1])) : undefined);
    });

    // lists
    const pickButton = (text, value, current, onClick, title) => {
      const button = el("button", "pick" + (current ? " current" : ""));
      button.append(el("span", "pick-name", text), el("span", "pick-value", value));
      button.setAttribute("aria-pressed", current ? "true" : "false");
      if (title) button.title = title;
      button.addEventListener("click", onClick);
      const item = el("li");
      item.appendChild(button);
      return item;
    };
    function drawList() {
      const rows = view.reach.slice();
      if ($("section-order").value === "reach") rows.sort((x, y) => y.reach - x.reach || x.a - y.a);
      $("section-list").replaceChildren(...rows.map(({ a, reach, far }) => pickButton(
        nameOf(a), `reach ${reach.toFixed(2)} · ${Math.round(100 * far)}% beyond neighbours`, a === view.picked,
        () => pick(a), `${secs[a].label} ${secs[a].title} (tokens ${secs[a].start}–${secs[a].end - 1})`)));
      const list = $("section-list"), current = list.querySelector(".current")?.parentElement; // keep it in view
      if (current && (current.offsetTop < list.scrollTop || current.offsetTop + current.offsetHeight > list.scrollTop + list.clientHeight)) {
        list.scrollTop = current.offsetTop - list.clientHeight / 3;
      }
    }
    function drawDetail() {
      const a = view.picked, s = secs[a];
      $("section-picked").textContent = `${nameOf(a)} · tokens ${s.start}–${s.end - 1} (${s.end - s.start})`;
      const sources = sourcesOf(a);
      const others = sources.filter((x) => x.b !== a && x.v >= 0.0005);
      const own = view.flow[a * S + a];
      $("section-summary").textContent = (others.length
        ? `${labelOf(a)} draws, beyond itself, most on ` + others.slice(0, 2).map((x) => `${nameOf(x.b)} (${x.v.toFixed(3)}, ${away(a, x.b)})`).join(" and ")
        : `${labelOf(a)} draws on no other section`) + `; ${Math.round(100 * own)}% of its attention stays within it.` +
        (SF.causal ? " Causal model: it cannot draw on later sections." : "");
      const shown = sources.filter((x) => x.v >= 0.0005);
      const top = Math.max(shown[0]?.v ?? 0, 1e-9);
      $("section-sources").replaceChildren(...shown.map(({ b, v }) => {
        const item = pickButton(nameOf(b), `${v.toFixed(3)} · ${away(a, b)}`, b === view.source, () => pick(a, b));
        const bar = el("span", "bar");
        bar.style.width = `${(100 * v / top).toFixed(1)}%`;
        item.firstChild.prepend(bar);
        return item;
      }));
      if (shown.length < S) $("section-sources").appendChild(el("li", "caption", `${S - shown.length} more below 0.0005${SF.causal ? " (later sections: zero, causal)" : ""}`));
      drawLinks();
    }
    const gapBefore = (t) => (D.spacing ? (D.spacing[t] ? " " : "") : " ");
    function context(i, width = 5) {
      const box = el("span", "context"), lo = Math.max(0, i - width), hi = Math.min(L, i + width + 1);
      let before = lo > 0 ? "…" : "";
      for (let t = lo; t < i; t++) before += (t > lo ? gapBefore(t) : "") + tokens[t];
      let after = "";
      for (let t = i + 1; t < hi; t++) after += gapBefore(t) + tokens[t];
      box.append(document.createTextNode(before + (i > lo ? gapBefore(i) : "")), el("mark", "", tokens[i]),
        document.createTextNode(after + (hi < L ? "…" : "")));
      return box;
    }
    function drawLinks() {
      const a = view.picked, b = view.source;
      const layers = view.layer === "all" ? [...Array(N).keys()] : [view.layer];
      const heads = view.head === "all" ? [...Array(H).keys()] : [view.head];
      const count = layers.length * heads.length, found = new Map();
      for (const l of layers) {
        for (const h of heads) {
          for (let i = secs[a].start; i < secs[a].end; i++) {
            const base = linkOffset(l, h, i);
            for (let r = 0; r < K; r++) {
              const j = linkIndex[base + r];
              if (j < secs[b].start || j >= secs[b].end) continue;
              const w = linkWeight[base + r] / 65535, key = i * L + j;
              let entry = found.get(key);
              if (!entry) found.set(key, (entry = { i, j, sum: 0, n: 0, best: -1, l: 0, h: 0 }));
              entry.sum += w;
              entry.n++;
              if (w > entry.best) Object.assign(entry, { best: w, l, h });
            }
          }
        }
      }
      const links = [...found.values()].sort((x, y) => y.sum - x.sum || x.i - y.i).slice(0, 20);
      $("section-links-title").textContent = `Strongest token links: ${labelOf(a)} → ${labelOf(b)}`;
      $("section-links-caption").textContent = (count > 1
        ? `Pairs among each query token's ${K} strongest keys, mean weight over the ${count} heads averaged ` +
          "(a head where the pair is not among the query's strongest counts as 0); click one to open its strongest head."
        : `Pairs among each query token's ${K} strongest keys in this head; click one to open it in the head view.`);
      if (!links.length) {
        $("section-links").replaceChildren(el("li", "caption", `No token of ${labelOf(a)} has a key in ${labelOf(b)} among its ${K} strongest.`));
        return;
      }
      $("section-links").replaceChildren(...links.map((x) => {
        const button = el("button", "link");
        button.append(context(x.i), el("span", "arrow", " → "), context(x.j),
          el("span", "pick-value", count > 1
            ? `${(x.sum / count).toFixed(3)} · in ${x.n} of ${count} heads, strongest ${D.layer_names[x.l]} H${x.h} (${x.best.toFixed(2)})`
            : x.best.toFixed(3)));
        button.title = `token ${x.i} → token ${x.j}`;
        button.addEventListener("click", () => {
          state.pinned = x.i;
          selectHead(x.l, x.h);
          $("head-view").scrollIntoView({ behavior: "smooth" });
        });
        const item = el("li");
        item.appendChild(button);
        return item;
      }));
    }
    function pick(a, b) {
      view.picked = a;
      view.source = b ?? strongestOther(a);
      drawMap();
      drawList();
      drawDetail();
    }
    let updates = 0; // the latest choice wins: a slower decode of an older choice is dropped
    async function update() {
      const ticket = ++updates;
      const layer = layerSel.value === "all" ? "all" : Number(layerSel.value);
      view.layer = layer;
      syncHeads();
      if (!headKept(layer)) headSel.value = "all";
      const head = headSel.value === "all" ? "all" : Number(headSel.value);
      const flow = await flowFor(layer, head);
      if (ticket !== updates) return;
      view.layer = layer;
      view.head = head;
      view.flow = flow;
      view.reach = reachOf(view.flow);
      paintImage();
      pick(view.picked, view.source);
    }
    layerSel.addEventListener("change", update);
    headSel.addEventListener("change", update);
    pastBox.addEventListener("change", () => { paintImage(); drawMap(); });
    $("section-order").addEventListener("change", drawList);
    syncHeads();
    paintImage();
    const first = view.reach.slice().sort((x, y) => y.reach - x.reach || x.a - y.a)[0].a;
    pick(first);
  }
  if (D.sections.length && D.section_flow) await setupSections();

  selectHead(0, 0);
  document.body.dataset.ready = "1";
})().catch((err) => {
  document.body.dataset.error = String(err);
  console.error(err);
});
