// The search page: keeps the query in the URL (?q=... or ?image=UPLOAD), asks POST /api/search for pages
// of results and shows them as a grid of thumbnails; a result's link searches for more like it.
"use strict";

const PAGE_SIZE = 40;
const $ = (id) => document.getElementById(id);
// failed: a page failed to load; scrolling stops loading until "Load more" is pressed.
const state = { search: null, cursor: null, loading: false, failed: false, generation: 0 };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function post(body) {
  const response = await fetch("/api/search", body instanceof FormData
    ? { method: "POST", body }
    : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (response.status === 401) $("token-form").hidden = false;
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

// The date range and order, as the inputs hold them: "until" is inclusive, so the API's exclusive "before"
// is the day after it.
function filters() {
  const out = {};
  if ($("from").value) out.after = $("from").value;
  if ($("until").value) {
    const day = new Date($("until").value + "T00:00:00Z");
    day.setUTCDate(day.getUTCDate() + 1);
    out.before = day.toISOString().slice(0, 10);
  }
  if ($("sort").value === "date") out.sort = "date";
  return out;
}

function requestFor(search, cursor) {
  const base = { top_k: PAGE_SIZE, cursor, ...filters() };
  return search.q !== undefined ? { ...base, query: search.q } : { ...base, terms: [{ upload: search.image }] };
}

function timestamp(seconds) {
  const s = Math.floor(seconds), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  const two = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${two(m)}:${two(s % 60)}` : `${two(m)}:${two(s % 60)}`;
}

function playVideo(id, time) {
  const video = $("player-video");
  video.src = `/api/items/${id}/video#t=${time}`;
  video.addEventListener("loadedmetadata", () => { if (Math.abs(video.currentTime - time) > 0.5) video.currentTime = time; },
                         { once: true });
  $("player").showModal();
  video.play().catch(() => {});  // autoplay may be refused: the controls are there
}

function resultElement(result) {
  const item = document.createElement("li");
  const link = document.createElement("a");
  link.className = "result";
  link.href = "?q=" + encodeURIComponent(`id:${result.id}`);
  link.dataset.id = result.id;
  const name = result.path.split("/").pop();  // a frame's path is VIDEO@mm:ss
  const date = result.captured ? result.captured.slice(0, 10) : "";
  link.title = `${result.path}${result.caption ? "\n" + result.caption : ""}\n${result.width}×${result.height}` +
               `${date ? "\ntaken " + result.captured.slice(0, 16).replace("T", " ") : ""} — open to see more like it`;
  const img = document.createElement("img");
  img.src = result.thumbnail_url;
  img.alt = result.caption || name;
  img.loading = "lazy";
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.innerHTML = '<span class="name"></span><span class="date"></span><span class="score"></span>';
  meta.children[0].textContent = name;
  meta.children[1].textContent = date;
  meta.children[2].textContent = result.score.toFixed(3);
  link.append(img, meta);
  item.append(link);
  if (result.time !== null && result.time !== undefined) {  // a frame of a video: play it from there
    const play = document.createElement("button");
    play.type = "button";
    play.className = "play";
    play.dataset.id = result.id;
    play.dataset.time = result.time;
    play.textContent = "▶ " + timestamp(result.time);
    play.title = "play the video from here";
    item.append(play);
  }
  if (result.tags && result.tags.length) {
    const tags = document.createElement("span");
    tags.className = "tags";
    for (const label of result.tags) {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "tag";
      chip.dataset.tag = label;
      chip.textContent = label;
      chip.title = `only photos tagged "${label}"`;
      tags.append(chip);
    }
    item.append(tags);
  }
  return item;
}

function showPage(data, generation) {
  if (generation !== state.generation) return;
  $("results").append(...data.results.map(resultElement));
  state.cursor = data.next_cursor;
  const shown = $("results").children.length;
  setStatus(shown ? `${shown} result${shown === 1 ? "" : "s"}${state.cursor ? " (scroll for more)" : ""}`
                  : "No results");
  $("load-more").hidden = !state.cursor;
}

// The observer fires only when the sentinel comes into view: keep loading while it stays in view.
function fillViewport() {
  if (state.cursor && !state.failed && $("more-sentinel").getBoundingClientRect().top < window.innerHeight) loadMore();
}

async function loadMore() {
  if (!state.search || !state.cursor || state.loading) return;
  state.loading = true;
  const generation = state.generation;
  try {
    showPage(await post(requestFor(state.search, state.cursor)), generation);
  } catch (error) {
    state.failed = true;
    setStatus(error.message, true);
  } finally {
    state.loading = false;
    fillViewport();
  }
}

async function start(search, firstPage) {
  state.search = search;
  state.cursor = null;
  state.failed = false;
  state.generation += 1;
  const generation = state.generation;
  $("results").replaceChildren();
  $("load-more").hidden = true;
  $("duplicate-groups").hidden = true;
  $("q").value = search.q || "";
  $("query-image").hidden = !search.preview;
  if (search.preview) $("query-image").src = search.preview;
  setStatus("Searching…");
  state.loading = true;
  try {
    showPage(await (firstPage || post(requestFor(search, null))), generation);
  } catch (error) {
    if (generation === state.generation) setStatus(error.message, true);
  } finally {
    state.loading = false;
    fillViewport();
  }
}

function go(search, firstPage) {
  const params = new URLSearchParams(search.q !== undefined ? { q: search.q } : { image: search.image });
  for (const id of ["from", "until", "sort"]) if ($(id).value && $(id).value !== "score") params.set(id, $(id).value);
  history.pushState(null, "", "?" + params.toString());
  return start(search, firstPage);
}

function fromUrl() {
  const params = new URLSearchParams(location.search);
  $("from").value = params.get("from") || "";
  $("until").value = params.get("until") || "";
  $("sort").value = params.get("sort") === "date" ? "date" : "score";
  if (params.get("view") === "duplicates") return showDuplicates(params.get("threshold"));
  if (params.get("q")) return start({ q: params.get("q") });
  if (params.get("image")) return start({ image: params.get("image") });
  setStatus("Type a query, or choose or drop an image.");
}

async function searchByImage(file) {
  if (!file || !file.type.startsWith("image/")) return setStatus("That is not an image file.", true);
  const form = new FormData();
  form.append("image", file);
  form.append("request", JSON.stringify({ top_k: PAGE_SIZE, ...filters() }));
  setStatus("Uploading…");
  const preview = URL.createObjectURL(file);
  try {
    const first = await post(form);
    await go({ image: first.upload, preview }, Promise.resolve(first));
  } catch (error) {
    setStatus(error.message, true);
  }
}

function moveFocus(event) {
  const links = [...document.querySelectorAll(".result")];
  const at = links.indexOf(document.activeElement);
  if (at < 0) return;
  const top = (el) => el.getBoundingClientRect().top;
  const columns = links.filter((el) => top(el) === top(links[0])).length || 1;
  const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns }[event.key];
  if (step === undefined) return;
  const next = links[Math.min(Math.max(at + step, 0), links.length - 1)];
  event.preventDefault();
  next.focus();
  if (at + step >= links.length - columns) loadMore();
}

function wire() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = $("q").value.trim();
    if (q) go({ q });
  });
  $("results").addEventListener("click", (event) => {
    const play = event.target.closest(".play");
    if (play) return playVideo(play.dataset.id, Number(play.dataset.time));
    const chip = event.target.closest(".tag");
    if (chip) {  // filter by the tag: added to the query (tag:LABEL, _ for a space) unless it is there
      const filter = "tag:" + chip.dataset.tag.replaceAll(" ", "_");
      const q = $("q").value.trim() || (state.search && state.search.q) || "";
      if (!q.split(/\s+/).includes(filter)) go({ q: q ? `${q} ${filter}` : filter });
      window.scrollTo(0, 0);
      return;
    }
    const link = event.target.closest(".result");
    if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
    event.preventDefault();
    go({ q: `id:${link.dataset.id}` });
    window.scrollTo(0, 0);
  });
  $("results").addEventListener("keydown", moveFocus);
  for (const id of ["from", "until", "sort"]) {
    $(id).addEventListener("change", () => { if (state.search) go(state.search); });
  }
  $("choose-image").addEventListener("click", () => $("image-input").click());
  $("similar-photos").addEventListener("click", (event) => {
    if (event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
    event.preventDefault();
    history.pushState(null, "", "?view=duplicates");
    showDuplicates(null);
  });
  $("image-input").addEventListener("change", (event) => searchByImage(event.target.files[0]));
  $("load-more").addEventListener("click", () => { state.failed = false; loadMore(); });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    document.cookie = `clipforge_token=${encodeURIComponent($("token").value)}; path=/; SameSite=Strict`;
    $("token-form").hidden = true;
    fromUrl();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "/" && document.activeElement !== $("q")) { event.preventDefault(); $("q").focus(); }
  });
  $("player").addEventListener("close", () => { $("player-video").pause(); $("player-video").removeAttribute("src"); });
  wireDrop();
  new IntersectionObserver((entries) => { if (entries[0].isIntersecting) loadMore(); })
    .observe($("more-sentinel"));
  window.addEventListener("popstate", fromUrl);
}

// The "Similar photos" view (?view=duplicates[&threshold=T]): the groups of GET /api/duplicates, each file
// with its size, pixels, date and cosine to the suggested keeper, which is marked. It only shows them.
async function showDuplicates(threshold) {
  state.search = null;
  state.cursor = null;
  state.generation += 1;
  const generation = state.generation;
  $("results").replaceChildren();
  $("load-more").hidden = true;
  $("duplicate-groups").replaceChildren();
  $("duplicate-groups").hidden = false;
  $("q").value = "";
  $("query-image").hidden = true;
  setStatus("Looking for similar photos…");
  const url = "/api/duplicates" + (threshold ? "?threshold=" + encodeURIComponent(threshold) : "");
  try {
    const response = await fetch(url);
    const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (response.status === 401) $("token-form").hidden = false;
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    if (generation !== state.generation) return;
    $("duplicate-groups").append(...data.groups.map(groupElement));
    const files = data.groups.reduce((n, g) => n + g.members.length - 1, 0);
    const bytes = data.groups.reduce((n, g) => n + g.redundant_bytes, 0);
    setStatus(data.groups.length
      ? `${data.groups.length} group${data.groups.length === 1 ? "" : "s"} of similar photos (cosine ≥ ` +
        `${data.threshold}): ${files} file${files === 1 ? "" : "s"} besides the suggested keepers, ` +
        `${sizeText(bytes)}. Nothing is deleted.`
      : `No similar photos among ${data.items} photos (cosine ≥ ${data.threshold}).`);
  } catch (error) {
    if (generation === state.generation) setStatus(error.message, true);
  }
}

function sizeText(bytes) {
  const units = ["bytes", "KB", "MB", "GB"];
  let unit = 0;
  while (bytes >= 1000 && unit < units.length - 1) { bytes /= 1000; unit += 1; }
  return unit ? `${bytes.toFixed(1)} ${units[unit]}` : `${bytes} bytes`;
}

function groupElement(group) {
  const item = document.createElement("li");
  item.className = "duplicate-group";
  item.dataset.keeper = group.keeper;
  const heading = document.createElement("h2");
  heading.textContent = `${group.kind === "exact" ? "Exact copies" : "Similar photos"}: ${group.members.length} ` +
                        `files, ${sizeText(group.redundant_bytes)} besides the keeper`;
  const files = document.createElement("ul");
  files.append(...group.members.map((member) => memberElement(member, member.id === group.keeper)));
  item.append(heading, files);
  return item;
}

function memberElement(member, keeper) {
  const item = document.createElement("li");
  const link = document.createElement("a");
  link.className = "duplicate" + (keeper ? " keeper" : "");
  link.href = "?q=" + encodeURIComponent(`id:${member.id}`);
  link.dataset.id = member.id;
  link.title = `${member.path} — open to see more like it`;
  const img = document.createElement("img");
  img.src = member.thumbnail_url;
  img.alt = member.path.split("/").pop();
  img.loading = "lazy";
  const meta = document.createElement("span");
  meta.className = "meta";
  const note = keeper ? "Keep" : member.exact ? "same bytes" : `cosine ${member.similarity.toFixed(3)}`;
  const date = member.captured ? member.captured.slice(0, 10) : "no date";
  for (const [name, text] of [["note", note], ["name", img.alt],
                              ["facts", `${member.width}×${member.height} · ${sizeText(member.size)} · ${date}`]]) {
    const part = document.createElement("span");
    part.className = name;
    part.textContent = text;
    meta.append(part);
  }
  link.append(img, meta);
  item.append(link);
  return item;
}

function wireDrop() {
  let depth = 0;
  const overlay = $("drop-overlay");
  document.addEventListener("dragenter", (event) => { event.preventDefault(); depth += 1; overlay.hidden = false; });
  document.addEventListener("dragleave", () => { depth -= 1; if (depth <= 0) { depth = 0; overlay.hidden = true; } });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    overlay.hidden = true;
    searchByImage(event.dataTransfer.files[0]);
  });
}

wire();
fromUrl();
