"""The web chat page served at `/`: one self-contained HTML/JS page (no build step, no CDN).

It talks to the same /v1 routes as any client: attachments become content parts (image_url data
URIs, input_audio, video_url, file), answers stream over SSE, "draw ..." prompts may ask /v1/images/generations.
The key is entered once (or arrives as ?key= and is removed from the address bar) and kept in
sessionStorage.
"""

KEY_FORM = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>OmniLM: key needed</title></head>
<body><main><h1>OmniLM</h1><p>This server needs its API key.</p>
<form method="get" action="/"><label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="off" autofocus required>
<button type="submit">Open chat</button></form></main></body></html>
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>OmniLM chat</title>
<style>
  :root { font-family: system-ui, sans-serif; color-scheme: light dark; }
  body { margin: 0; display: flex; flex-direction: column; height: 100vh; }
  header, footer { padding: .5rem 1rem; display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; }
  header { border-bottom: 1px solid #8884; }
  footer { border-top: 1px solid #8884; }
  #log { flex: 1; overflow-y: auto; padding: 1rem; }
  .msg { margin: .5rem 0; padding: .5rem .75rem; border-radius: .5rem; max-width: 48rem; white-space: pre-wrap; }
  .user { background: #4a90e222; margin-left: auto; }
  .assistant { background: #8882; }
  .error { background: #e4444433; }
  .msg img { display: block; width: 6rem; image-rendering: pixelated; margin-top: .25rem; }
  #prompt { flex: 1; min-width: 12rem; font: inherit; padding: .4rem; }
  label { font-size: .9rem; }
  button:focus-visible, input:focus-visible, textarea:focus-visible { outline: 3px solid #4a90e2; }
  #attached { font-size: .85rem; }
</style>
</head>
<body>
<header>
  <strong>OmniLM</strong>
  <label>Temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0"></label>
  <label>Max tokens <input id="max-tokens" type="number" min="1" max="4096" value="64"></label>
  <label>API key <input id="key" type="password" autocomplete="off" aria-describedby="key-help"></label>
  <span id="key-help" hidden>Sent as Authorization: Bearer</span>
  <button id="reset" type="button">New chat</button>
</header>
<main id="log" role="log" aria-live="polite" aria-label="Conversation"></main>
<footer>
  <form id="form" style="display:contents">
    <label for="attach">Attach image, audio or PDF</label>
    <input id="attach" type="file" multiple accept="image/*,audio/*,video/*,.pdf,.csv,.md,.txt,.json,.html">
    <span id="attached" aria-live="polite"></span>
    <label for="prompt" class="visually-hidden">Message</label>
    <textarea id="prompt" rows="2" placeholder="Ask something; Enter sends, Shift+Enter is a new line"></textarea>
    <button id="send" type="submit">Send</button>
  </form>
</footer>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];
let pending = [];

const params = new URLSearchParams(location.search);
if (params.get("key")) {
  sessionStorage.setItem("omnilm-key", params.get("key"));
  window.history.replaceState(null, "", location.pathname);
}
$("key").value = sessionStorage.getItem("omnilm-key") || "";
$("key").addEventListener("change", () => sessionStorage.setItem("omnilm-key", $("key").value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function readAsBase64(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).split(",")[1]);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function toPart(file) {
  const data = await readAsBase64(file);
  if (file.type.startsWith("image/")) {
    return { type: "image_url", image_url: { url: "data:" + file.type + ";base64," + data } };
  }
  if (file.type.startsWith("audio/")) {
    const ext = (file.name.split(".").pop() || "wav").toLowerCase();
    const format = ["wav", "mp3", "flac", "ogg"].includes(ext) ? ext : "wav";
    return { type: "input_audio", input_audio: { data, format } };
  }
  if (file.type.startsWith("video/")) {
    return { type: "video_url", video_url: { url: "data:" + file.type + ";base64," + data } };
  }
  return { type: "file", file: { file_data: data, filename: file.name } };
}

$("attach").addEventListener("change", async () => {
  pending = await Promise.all([...$("attach").files].map(toPart));
  $("attached").textContent = pending.length ? pending.length + " file(s) attached" : "";
});

$("reset").addEventListener("click", () => {
  history.length = 0;
  $("log").textContent = "";
  $("prompt").focus();
});

$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("form").requestSubmit();
  }
});

async function drawImage(text, out) {
  const r = await fetch("/v1/images/generations", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ prompt: text, response_format: "b64_json" }),
  });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
  out.textContent = "";
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + body.data[0].b64_json;
  img.alt = "generated image for: " + text;
  out.appendChild(img);
}

async function send(text) {
  const parts = pending.slice();
  pending = [];
  $("attach").value = "";
  $("attached").textContent = "";
  const content = parts.length ? [...parts, { type: "text", text }] : text;
  const mine = bubble("user", text + (parts.length ? "  [" + parts.length + " attachment(s)]" : ""));
  for (const p of parts) {
    if (p.type !== "image_url") continue;
    const img = document.createElement("img");
    img.src = p.image_url.url;
    img.alt = "attached image";
    mine.appendChild(img);
  }
  history.push({ role: "user", content });
  const out = bubble("assistant", "");
  out.setAttribute("aria-busy", "true");
  if (!parts.length && /^draw\b/i.test(text)) {
    try { await drawImage(text, out); history.pop(); } catch (err) { out.className = "msg error"; out.textContent = err.message; history.pop(); }
    out.removeAttribute("aria-busy");
    return;
  }
  const r = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(),
    body: JSON.stringify({
      messages: history, stream: true,
      temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
    }),
  });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    out.className = "msg error";
    out.textContent = body.error ? body.error.message : r.status + " " + r.statusText;
    history.pop();
    out.removeAttribute("aria-busy");
    return;
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", answer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const ev of events) {
      const data = ev.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) { answer += c.delta.content; out.textContent = answer; }
      }
    }
  }
  out.removeAttribute("aria-busy");
  out.dataset.done = "true";
  history.push({ role: "assistant", content: answer });
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  send(text).catch((err) => bubble("error", String(err)));
});
$("prompt").focus();
</script>
</body>
</html>
"""
