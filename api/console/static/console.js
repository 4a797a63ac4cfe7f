// kdiga console: live progress over the API's server-sent events, and a refresh while validating.
// Served by the app itself (no build step, no CDN). At most MAX_STREAMS streams per page: browsers
// allow six HTTP/1.1 connections per host, and the page's own requests need some.
"use strict";
const MAX_STREAMS = 4;

function show(el, job) {
  const progress = job.progress || {};
  const percent = Number(progress.job_percent ?? progress.percent ?? 0);  // the whole job, else the phase
  el.querySelector("progress").value = percent;
  el.querySelector(".percent").textContent = percent.toFixed(0) + "%";
  el.querySelector(".phase").textContent = progress.phase || "";
  const status = el.querySelector(".status");
  status.textContent = job.status;
  status.className = "status status-" + job.status;
}

function follow(el) {
  const stream = new EventSource(el.dataset.events);
  stream.addEventListener("progress", (e) => show(el, JSON.parse(e.data)));
  stream.addEventListener("end", (e) => {
    show(el, JSON.parse(e.data));
    stream.close();
    if (el.closest("[data-reload-on-end]")) window.location.reload();  // the report and files are there now
  });
  stream.onerror = () => { if (stream.readyState === EventSource.CLOSED) el.classList.add("offline"); };
}

document.addEventListener("DOMContentLoaded", () => {
  Array.from(document.querySelectorAll("[data-events]")).slice(0, MAX_STREAMS).forEach(follow);
  const waiting = document.querySelector("[data-refresh]");
  if (waiting) setTimeout(() => window.location.reload(), Number(waiting.dataset.refresh));
});
