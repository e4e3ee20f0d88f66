// The job page: polls the job through its signed link, draws the tile grid, shows the result.
// No build step and no request outside this API's origin, apart from the result's own download
// link (a presigned storage URL) once the job has succeeded.
"use strict";

(function () {
  const token = new URLSearchParams(location.search).get("token") || "";
  const main = document.getElementById("job");
  const canvas = document.getElementById("grid");
  const tip = document.getElementById("tip");
  const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
  const COLOURS = { P: "#d9d9d9", R: "#f2b134", D: "#2e8b57", F: "#c0392b" };
  const NAMES = { P: "pending", R: "running", D: "done", F: "failed" };
  const MIN_POLL_MS = 1000;
  const MAX_POLL_MS = 5000;
  const DETAIL_PAGE = 500;

  let job = null;
  let pollMs = MIN_POLL_MS;
  let cell = 8;
  let mode = "state";
  let details = new Map(); // tile index -> detail document
  let detailsLoadedAt = 0;
  let samples = []; // [time ms, tiles done] for the rate and the estimate
  let sampled = null; // which grid the samples count: "tiles" or a statistics pass
  let viewerShown = false;

  function route(path, extra) {
    const query = new URLSearchParams({ token: token, ...(extra || {}) });
    return "view/" + path + "?" + query.toString();
  }

  async function getJson(path, extra) {
    const response = await fetch(route(path, extra), { cache: "no-store" });
    if (!response.ok) throw new Error(path + ": HTTP " + response.status);
    return response.json();
  }

  function seconds(value) {
    if (value === undefined || value === null) return "";
    return value < 60 ? value.toFixed(1) + " s" : Math.floor(value / 60) + " min " + Math.round(value % 60) + " s";
  }

  // While the statistics passes run, the grid and the numbers follow the pass under way;
  // the processing tiles' own counts stay in data-tiles-done and data-tiles-total.
  function currentPass() {
    const passes = job.statistics || [];
    if (job.stage !== "stats" || passes.length === 0) return null;
    const running = passes.find((pass) => pass.done < pass.total) || passes[passes.length - 1];
    return { summary: running, number: passes.indexOf(running) + 1, of: passes.length };
  }

  function shown() {
    const pass = currentPass();
    return pass ? pass.summary : job.tiles;
  }

  function render() {
    const tiles = job.tiles;
    const pass = currentPass();
    main.dataset.jobStatus = job.status;
    main.dataset.tilesDone = tiles ? String(tiles.done) : "0";
    main.dataset.tilesTotal = tiles ? String(tiles.total) : "0";
    main.dataset.statsDone = pass ? String(pass.summary.done) : "0";
    main.dataset.statsTotal = pass ? String(pass.summary.total) : "0";
    document.getElementById("job-id").textContent = job.job_id;
    document.title = "tilefan job " + job.status.toLowerCase();
    let status = job.status;
    if (pass) {
      status += ": statistics pass " + pass.number + " of " + pass.of + ", " +
        pass.summary.done + " of " + pass.summary.total + " tiles read";
    } else if (tiles) status += ": " + tiles.done + " of " + tiles.total + " tiles done";
    if (!pass && tiles && tiles.failed) status += ", " + tiles.failed + " failed";
    document.getElementById("status").textContent = status;
    renderStages();
    renderNumbers();
    drawGrid();
    document.getElementById("cancel").hidden = TERMINAL.has(job.status);
    if (job.status === "FAILED" || job.status === "CANCELLED") renderFailure();
    if (job.status === "SUCCEEDED") renderResult();
  }

  function renderStages() {
    const order = ["split", "stats", "process", "merge"];
    const at = job.stage === "done" ? order.length : order.indexOf(job.stage);
    for (const item of document.querySelectorAll("#stages li")) {
      if (item.dataset.stage === "stats") item.hidden = (job.statistics || []).length === 0;
      const index = order.indexOf(item.dataset.stage);
      item.classList.toggle("active", index === at && !TERMINAL.has(job.status));
      const took = job.timings[item.dataset.stage];
      item.classList.toggle("finished", took !== undefined);  // a stage has a time once it ended
      item.querySelector(".time").textContent = seconds(took);
    }
  }

  function renderNumbers() {
    const tiles = shown();
    if (!tiles) return;
    document.getElementById("tiles").textContent = tiles.done + " / " + tiles.total;
    const now = Date.now();
    const counting = tiles === job.tiles ? "tiles" : "pass " + tiles.before_step;
    if (counting !== sampled) samples = [];
    sampled = counting;
    samples.push([now, tiles.done]);
    samples = samples.filter((sample) => now - sample[0] < 30000);
    const first = samples[0];
    const elapsed = (now - first[0]) / 1000;
    const rate = elapsed > 0 ? (tiles.done - first[1]) / elapsed : 0;
    document.getElementById("rate").textContent = rate > 0 ? rate.toFixed(1) : "–";
    const pixelsPerTile = (tiles.output_pixels || tiles.pixels) / tiles.total;
    document.getElementById("throughput").textContent =
      rate > 0 ? ((rate * pixelsPerTile) / 1e6).toPrecision(3) + " MP/s" : "–";
    const left = tiles.total - tiles.done;
    document.getElementById("eta").textContent =
      TERMINAL.has(job.status) ? "–" : rate > 0 ? seconds(left / rate) : "–";
  }

  function renderFailure() {
    const section = document.getElementById("failure");
    section.hidden = false;
    const error = job.error || { code: job.status, message: "the job was cancelled" };
    document.getElementById("error-code").textContent = error.code;
    document.getElementById("error-message").textContent = error.message;
  }

  function renderResult() {
    const section = document.getElementById("result");
    section.hidden = false;
    const download = document.getElementById("download");
    download.href = route("result");
    if (viewerShown) return;
    viewerShown = true;
    const format = (job.output || {}).format;
    if (["dzi", "iiif"].includes(format) || (job.output || {}).preview) {
      showTileSet();
    } else if (["jpeg", "png", "webp"].includes(format)) {
      // The canvas drawer: WebGL cannot take an image from another origin (the presigned URL).
      OpenSeadragon({ id: "viewer", drawer: "canvas", tileSources: { type: "image", url: route("result") }, showNavigationControl: false });
    } else {
      document.getElementById("viewer").hidden = true;
      const notice = document.getElementById("no-preview");
      notice.hidden = false;
      notice.textContent = "Browsers cannot show a " + format + " result: download it to view it.";
    }
  }

  async function showTileSet() {
    // A tile set, or a result's preview set: its tiles come through this API, named by
    // the viewer's level, column and row.
    const set = await getJson("set");
    OpenSeadragon({
      id: "viewer",
      drawer: "canvas",
      showNavigationControl: false,
      tileSources: {
        width: set.width,
        height: set.height,
        tileSize: set.tile_size,
        tileOverlap: set.overlap,
        minLevel: set.min_level,
        maxLevel: set.max_level,
        getTileUrl: (level, x, y) => route("set/" + level + "/" + x + "/" + y),
      },
    });
  }

  // --- the tile grid -----------------------------------------------------------------------

  function drawGrid() {
    const tiles = shown();
    if (!tiles) return;
    const width = Math.min(canvas.parentElement.clientWidth || 600, 1200);
    cell = Math.max(1, Math.min(28, Math.floor(width / tiles.columns)));
    const ratio = window.devicePixelRatio || 1;
    canvas.dataset.columns = String(tiles.columns);
    canvas.style.width = tiles.columns * cell + "px";
    canvas.style.height = tiles.rows * cell + "px";
    canvas.width = tiles.columns * cell * ratio;
    canvas.height = tiles.rows * cell * ratio;
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    const maxima = heatMaxima();
    for (let row = 0; row < tiles.rows; row++) {
      const line = tiles.grid[row];
      for (let column = 0; column < tiles.columns; column++) {
        drawCell(context, row, column, line[column], maxima, tiles);
      }
    }
  }

  function heatMaxima() {
    let duration = 1;
    let attempts = 1;
    for (const tile of details.values()) {
      duration = Math.max(duration, tile.duration_ms || 0);
      attempts = Math.max(attempts, tile.attempts || 0);
    }
    return { duration: duration, attempts: attempts };
  }

  function heatColour(value, maximum) {
    const share = Math.max(0, Math.min(1, value / maximum));
    const light = Math.round(92 - share * 62);
    return "hsl(" + Math.round(210 - share * 210) + ", 70%, " + light + "%)";
  }

  function drawCell(context, row, column, letter, maxima, tiles) {
    const x = column * cell;
    const y = row * cell;
    const index = row * tiles.columns + column;
    const tile = tiles === job.tiles ? details.get(index) : undefined;
    let fill = COLOURS[letter] || "#fff";
    if (mode !== "state" && tile) {
      fill = mode === "duration"
        ? heatColour(tile.duration_ms || 0, maxima.duration)
        : heatColour(tile.attempts || 0, maxima.attempts);
    }
    context.fillStyle = letter === "P" && mode === "state" ? "#fff" : fill;
    context.fillRect(x, y, cell, cell);
    if (cell < 4) return;
    // Readable without colour: an outline (pending), stripes (running), a cross (failed).
    context.strokeStyle = "#333";
    context.lineWidth = 1;
    if (letter === "P") context.strokeRect(x + 0.5, y + 0.5, cell - 1, cell - 1);
    if (letter === "R") {
      context.beginPath();
      for (let offset = -cell; offset < cell; offset += 4) {
        context.moveTo(x + Math.max(0, offset), y + Math.max(0, -offset));
        context.lineTo(x + Math.min(cell, offset + cell), y + Math.min(cell, cell - offset));
      }
      context.stroke();
    }
    if (letter === "F") {
      context.strokeStyle = "#fff";
      context.lineWidth = 2;
      context.beginPath();
      context.moveTo(x + 1, y + 1);
      context.lineTo(x + cell - 1, y + cell - 1);
      context.moveTo(x + cell - 1, y + 1);
      context.lineTo(x + 1, y + cell - 1);
      context.stroke();
    }
    if (cell >= 14) {
      context.fillStyle = letter === "D" || letter === "F" ? "#fff" : "#111";
      context.font = Math.floor(cell * 0.6) + "px system-ui, sans-serif";
      context.textAlign = "center";
      context.textBaseline = "middle";
      context.fillText(letter, x + cell / 2, y + cell / 2 + 1);
    }
  }

  // --- tile detail: hover and heat maps ----------------------------------------------------

  let hoverTimer = null;

  function tileAt(event) {
    const box = canvas.getBoundingClientRect();
    const column = Math.floor((event.clientX - box.left) / cell);
    const row = Math.floor((event.clientY - box.top) / cell);
    const tiles = job && shown();
    if (!tiles || row < 0 || column < 0 || row >= tiles.rows || column >= tiles.columns) return null;
    const index = row * tiles.columns + column;
    return { row: row, column: column, index: index, letter: tiles.grid[row][column], pass: tiles !== job.tiles };
  }

  function describe(place) {
    const tile = place.pass ? undefined : details.get(place.index);
    let text = (place.pass ? "Statistics tile " : "Tile ") + place.index + " (row " + place.row + ", column " + place.column + "): " + NAMES[place.letter];
    if (tile) {
      text += ", " + tile.attempts + " attempt" + (tile.attempts === 1 ? "" : "s");
      if (tile.duration_ms !== null && tile.duration_ms !== undefined) text += ", " + tile.duration_ms + " ms";
      if (tile.error) text += ": " + tile.error;
    }
    tip.textContent = text;
    tip.hidden = false;
  }

  function onPoint(event) {
    const place = tileAt(event);
    if (!place) { tip.hidden = true; return; }
    describe(place);
    clearTimeout(hoverTimer);
    if (place.pass) return; // a statistics tile has no detail beyond its state
    // One detail request per resting pointer, not one per pixel moved.
    hoverTimer = setTimeout(async () => {
      try {
        const page = await getJson("tiles", { cursor: String(place.index), limit: "1" });
        for (const tile of page.tiles) details.set(tile.index, tile);
        describe(place);
      } catch (error) { /* the next poll shows what matters */ }
    }, 400);
  }

  async function loadDetails() {
    // Every tile's detail, a page every half second at most: for heat maps.
    let cursor = "0";
    while (cursor !== null && cursor !== undefined) {
      const page = await getJson("tiles", { cursor: cursor, limit: String(DETAIL_PAGE) });
      for (const tile of page.tiles) details.set(tile.index, tile);
      cursor = page.next_cursor;
      if (cursor) await new Promise((resolve) => setTimeout(resolve, 500));
    }
    detailsLoadedAt = Date.now();
    drawGrid();
  }

  // --- polling -----------------------------------------------------------------------------

  async function poll() {
    let changed = true;
    try {
      const next = await getJson("state");
      changed = !job || next.status !== job.status ||
        JSON.stringify([next.tiles, next.statistics]) !== JSON.stringify([job.tiles, job.statistics]);
      job = next;
      render();
      if (mode !== "state" && Date.now() - detailsLoadedAt > 15000) await loadDetails();
    } catch (error) {
      document.getElementById("status").textContent = "Could not reach the job: " + error.message;
      changed = false;
    }
    if (job && TERMINAL.has(job.status)) return;
    pollMs = changed ? MIN_POLL_MS : Math.min(MAX_POLL_MS, pollMs * 1.5);
    setTimeout(poll, pollMs);
  }

  for (const input of document.querySelectorAll('input[name="mode"]')) {
    input.addEventListener("change", async () => {
      mode = input.value;
      if (mode !== "state") await loadDetails();
      drawGrid();
    });
  }
  canvas.addEventListener("mousemove", onPoint);
  canvas.addEventListener("click", onPoint);
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
  document.getElementById("cancel").addEventListener("click", async () => {
    if (!confirm("Cancel this job?")) return;
    await fetch(route("cancel"), { method: "POST" });
    poll();
  });
  window.addEventListener("resize", () => { if (job) drawGrid(); });
  poll();
})();
