// The viewer's dashboard: a tile per camera (state, rate, people in the picture; from
// /cameras.json every 2 s), and each stream's panel filled from the Server-Sent Events of
// /events/<stream> (see services/viewer/web.py). With several streams, a click on a tile
// opens that camera's panel alone (its address ends in #<stream>); the others are closed,
// so only the open one streams its picture. Plain JavaScript, no build step, no library. Every label is written as text; colours only repeat it. The emotion colours
// are the shared palette (services/common/palette.py), which the page carries in
// <body data-palette>, so the dashboard draws what the viewer, reports and charts draw.
"use strict";

const PALETTE = JSON.parse(document.body.dataset.palette || "{}");
const WINDOW_S = 60;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function colour(emotion) {
  return PALETTE[emotion] || "#fff";
}

function percent(value) {
  return Math.round(value * 100) + "%";
}

function faceItem(face, emotions, recorder, stream) {
  const item = element("li", "face");
  const title = element("div", "face-title");
  const name = face.track === null ? "new face" : "#" + face.track;
  title.append(element("span", "who", name + " " + face.label + " " + percent(face.confidence)));
  if (face.age_s !== null) {
    title.append(element("span", "since", Math.round(face.age_s) + " s on screen"));
  }
  item.append(title);
  const bars = element("div", "bars");
  emotions.forEach((emotion, i) => {
    bars.append(element("span", "emotion", emotion));
    const bar = element("div", "bar");
    const fill = element("span");
    fill.style.width = percent(face.scores[i]);
    fill.style.background = colour(emotion);
    bar.append(fill);
    bars.append(bar, element("span", "pct", percent(face.scores[i])));
  });
  item.append(bars);
  if (recorder && face.track !== null) {
    const link = element("a", "history", "history");
    link.href = recorder + "/api/tracks?stream=" + encodeURIComponent(stream);
    item.append(link);
  }
  return item;
}

function drawTimeline(canvas, points, emotions) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#6b717c";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText("-60 s", 4, h - 4);
  ctx.fillText("now", w - 26, h - 4);
  const plot = h - 16;
  const x = (age) => w - (age / WINDOW_S) * w;
  let below = points.map(() => 0);
  emotions.forEach((emotion, i) => {
    // one band per emotion: along its top edge, then back along its bottom edge
    const above = points.map((p, k) => below[k] + p.shares[i]);
    if (points.length > 1) {
      ctx.fillStyle = colour(emotion);
      ctx.beginPath();
      points.forEach((p, k) => ctx.lineTo(x(p.age), plot * (1 - above[k])));
      for (let k = points.length - 1; k >= 0; k--) {
        ctx.lineTo(x(points[k].age), plot * (1 - below[k]));
      }
      ctx.closePath();
      ctx.fill();
    }
    below = above;
  });
  canvas.dataset.points = String(points.length);
}

function watch(section) {
  const stream = section.dataset.stream;
  const recorder = section.dataset.recorder || "";
  const meta = section.querySelector(".meta");
  const faces = section.querySelector(".faces");
  const canvas = section.querySelector(".timeline");
  const legend = section.querySelector(".legend");
  let points = [];      // {n, at: client time of the point, shares}
  let emotions = [];
  let lastUpdate = 0;

  const source = new EventSource("/events/" + encodeURIComponent(stream));
  source.onmessage = (message) => {
    const panel = JSON.parse(message.data);
    const now = Date.now() / 1000;
    lastUpdate = now;
    if (emotions.length === 0) {
      emotions = panel.emotions;
      emotions.forEach((emotion) => {
        const entry = element("li");
        const swatch = element("i");
        swatch.style.background = colour(emotion);
        entry.append(swatch, document.createTextNode(emotion));
        legend.append(entry);
      });
    }
    const latency = panel.latency_ms === null ? "-" : panel.latency_ms + " ms";
    const from = panel.source === "tracker" ? "tracked, smoothed" : "raw, no tracker running";
    meta.textContent = "model " + (panel.model || "-") + " · " + panel.fps + " fps · latency "
      + latency + " · " + from;
    meta.classList.remove("stale");
    faces.replaceChildren(...(panel.faces.length
      ? panel.faces.map((face) => faceItem(face, emotions, recorder, stream))
      : [element("li", "face", "no face in the picture")]));
    panel.timeline.forEach((p) => {
      if (!points.length || p.n > points[points.length - 1].n) {
        points.push({n: p.n, at: now - p.age_s, shares: p.shares});
      }
    });
    points = points.filter((p) => now - p.at <= WINDOW_S);
    drawTimeline(canvas, points.map((p) => ({age: now - p.at, shares: p.shares})), emotions);
  };
  source.onerror = () => {
    meta.textContent = "connection lost, retrying…";
    meta.classList.add("stale");
  };
  const timer = setInterval(() => {
    if (lastUpdate && Date.now() / 1000 - lastUpdate > 3) {
      meta.textContent = "no update for " + Math.round(Date.now() / 1000 - lastUpdate) + " s";
      meta.classList.add("stale");
    }
  }, 1000);
  return () => {
    source.close();
    clearInterval(timer);
  };
}

const sections = [...document.querySelectorAll("section.stream")];
const watching = new Map();  // stream -> what stops its updates

function open(section) {
  const img = section.querySelector("figure img");
  if (img.dataset.src) {
    img.src = img.dataset.src;
    delete img.dataset.src;
  }
  section.hidden = false;
  if (!watching.has(section.dataset.stream)) {
    watching.set(section.dataset.stream, watch(section));
  }
}

function close(section) {
  const img = section.querySelector("figure img");
  if (!img.dataset.src) {
    img.dataset.src = img.getAttribute("src");
    img.removeAttribute("src");  // ends its MJPEG stream
  }
  section.hidden = true;
  const stop = watching.get(section.dataset.stream);
  if (stop) stop();
  watching.delete(section.dataset.stream);
}

function select(stream) {
  if (sections.length < 2) return;
  const byStream = (id) => sections.find((s) => s.dataset.stream === id);
  const firstTile = [...document.querySelectorAll(".tile")].map((t) => byStream(t.dataset.stream))
    .find((s) => s);
  const chosen = byStream(stream) || firstTile || sections[0];
  sections.forEach((s) => (s === chosen ? open(s) : close(s)));
  document.querySelectorAll(".tile").forEach((tile) => {
    tile.setAttribute("aria-pressed", String(tile.dataset.stream === chosen.dataset.stream));
  });
}

function tileFor(nav, camera) {
  let tile = [...nav.children].find((t) => t.dataset.stream === camera.id);
  if (!tile) {
    tile = element("button", "tile");
    tile.type = "button";
    tile.dataset.stream = camera.id;
    tile.append(element("img", "thumb"), element("span", "name"), element("span", "state"),
      element("span", "people"), element("span", "where"));
    tile.querySelector(".thumb").alt = "";
    tile.addEventListener("click", () => {
      const known = sections.some((s) => s.dataset.stream === camera.id);
      location.hash = encodeURIComponent(camera.id);
      if (!known) location.reload();  // a stream that started after this page was made
      else select(camera.id);
    });
  }
  return tile;
}

function drawTiles(nav, cameras, round) {
  const tiles = cameras.map((camera) => {
    const tile = tileFor(nav, camera);
    tile.className = "tile state-" + camera.state;
    tile.title = camera.last_error || "";
    tile.querySelector(".name").textContent = camera.name;
    tile.querySelector(".state").textContent = camera.state
      + (camera.state === "up" ? " · " + Math.round(camera.fps) + " fps" : "");
    tile.querySelector(".people").textContent = camera.people === 1 ? "1 person" : camera.people + " people";
    tile.querySelector(".where").textContent = camera.location || "";
    const thumb = tile.querySelector(".thumb");
    if (camera.shown) thumb.src = "/snapshot/" + encodeURIComponent(camera.id) + ".jpg?n=" + round;
    else thumb.removeAttribute("src");
    return tile;
  });
  nav.replaceChildren(...tiles);
  nav.dataset.tiles = String(tiles.length);
}

function followCameras(nav) {
  let round = 0;
  const refresh = () => {
    fetch("/cameras.json", {cache: "no-store"})
      .then((response) => (response.ok ? response.json() : null))
      .then((answer) => {
        if (answer) drawTiles(nav, answer.cameras, round++);
      })
      .catch(() => {})
      .finally(() => select(decodeURIComponent(location.hash.slice(1))));
  };
  refresh();
  setInterval(refresh, 2000);
}

// One stream: its panel, open. Several: the one the address names, else the first tile's,
// once the tiles have come.
if (sections.length < 2) sections.forEach(open);
const nav = document.querySelector("nav.tiles");
if (nav) followCameras(nav);
