// The jobs list: loads the jobs the user may see, filters them, and keeps each row live from the
// event stream of every job (/v1/events), or by polling when the server has no such stream.

import { call, jobPath, openStream } from "./api.js";
import { $, el, liveStatus, replaceChildren, show } from "./dom.js";
import { formatPercent, formatTime, formatUsd, jobDuration, phaseBadge } from "./format.js";

const PAGE_SIZE = 100;
const POLL_MILLISECONDS = 5000;
const DETAIL_CONCURRENCY = 4;

const page = $("#jobs-page");
const isAdmin = page.dataset.admin === "true";
const body = $("#jobs-body");
const jobs = new Map(); // id -> JobView (the list's, or the job's own when fetched)
const order = []; // ids, newest first
let nextPageToken = null;
let pollTimer = null;

const filters = {
  phase: $("#filter-phase"),
  text: $("#filter-text"),
  tenant: $("#filter-tenant"),
};

function listQuery(pageToken) {
  const query = new URLSearchParams({ pageSize: String(PAGE_SIZE) });
  if (filters.phase.value) query.set("phase", filters.phase.value);
  if (isAdmin && filters.tenant && filters.tenant.value.trim()) query.set("tenant", filters.tenant.value.trim());
  if (pageToken) query.set("pageToken", pageToken);
  return `/v1/jobs?${query}`;
}

function matchesText(job) {
  const text = filters.text.value.trim().toLowerCase();
  if (!text) return true;
  const labels = Object.entries(job.labels || {}).map(([key, value]) => `${key}=${value}`);
  return [job.name, job.id, ...labels].some((value) => String(value).toLowerCase().includes(text));
}

function matchesServerFilters(job) {
  if (filters.phase.value && job.phase !== filters.phase.value) return false;
  const tenant = isAdmin && filters.tenant ? filters.tenant.value.trim() : "";
  return !tenant || job.tenant === tenant;
}

function headline(job) {
  const evaluation = job.summary && job.summary.evaluation;
  if (!evaluation) return "";
  const kl = evaluation.gapClosed && evaluation.gapClosed.kl;
  return formatPercent(kl ?? evaluation.recoveryPercent);
}

function row(job) {
  const badge = el("span");
  phaseBadge(badge, job.phase);
  const cost = job.summary && job.summary.cost ? formatUsd(job.summary.cost.totalUsd) : "";
  return el(
    "tr",
    { dataset: { jobId: job.id, phase: job.phase } },
    el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(job.id)}`, class: "job-link", text: job.name })),
    el("td", {}, el("code", { text: job.id })),
    el("td", { class: "phase-cell", title: job.message || "" }, badge),
    el("td", { text: job.owner ? `${job.tenant} / ${job.owner}` : job.tenant }),
    el("td", {}, el("time", { datetime: job.createdAt, text: formatTime(job.createdAt) })),
    el("td", { text: jobDuration(job) }),
    el("td", { class: "num", text: cost }),
    el("td", { class: "num headline", text: headline(job) }),
  );
}

function render() {
  const shown = order.map((id) => jobs.get(id)).filter((job) => matchesServerFilters(job) && matchesText(job));
  replaceChildren(body, shown.map(row));
  const filtered = filters.phase.value || filters.text.value.trim() || (filters.tenant && filters.tenant.value.trim());
  const empty = $("#jobs-empty");
  empty.hidden = shown.length > 0;
  if (filtered) replaceChildren(empty, "No job matches these filters.");
  else replaceChildren(empty, "No jobs yet. ", el("a", { href: "/submit", text: "Submit one." }));
  $("#load-more").hidden = !nextPageToken;
}

// The list holds no summaries: each job's own view (cost, headline) is fetched, a few at a time, and
// again only when the job has changed since.
const detailQueue = [];
const fetchedAt = new Map(); // id -> updatedAt of the job's own view last fetched
let detailRunning = 0;

function wantDetail(id) {
  if (!detailQueue.includes(id)) detailQueue.push(id);
  pumpDetails();
}

function pumpDetails() {
  while (detailRunning < DETAIL_CONCURRENCY && detailQueue.length > 0) {
    const id = detailQueue.shift();
    detailRunning += 1;
    refreshJob(id).finally(() => {
      detailRunning -= 1;
      pumpDetails();
    });
  }
}

async function refreshJob(id) {
  try {
    const job = await call(jobPath(id));
    if (!jobs.has(id)) order.unshift(id);
    jobs.set(id, job);
    fetchedAt.set(id, job.updatedAt);
    render();
  } catch (error) {
    if (error.status === 404 && jobs.has(id)) {
      jobs.delete(id);
      order.splice(order.indexOf(id), 1);
      render();
    }
  }
}

function remember(list, replace) {
  if (replace) order.length = 0;
  for (const job of list.jobs) {
    const unchanged = fetchedAt.get(job.id) === job.updatedAt;
    if (!unchanged) jobs.set(job.id, job);
    if (!order.includes(job.id)) order.push(job.id);
    if (!unchanged) wantDetail(job.id);
  }
}

async function load() {
  try {
    const list = await call(listQuery());
    nextPageToken = list.nextPageToken;
    remember(list, true);
    show($("#jobs-error"), "");
    render();
  } catch (error) {
    show($("#jobs-error"), `Cannot list the jobs: ${error.message}`);
  }
}

async function loadMore() {
  if (!nextPageToken) return;
  try {
    const list = await call(listQuery(nextPageToken));
    nextPageToken = list.nextPageToken;
    remember(list, false);
    render();
  } catch (error) {
    show($("#jobs-error"), `Cannot list more jobs: ${error.message}`);
  }
}

function startPolling() {
  if (pollTimer) return;
  liveStatus(`refreshing every ${POLL_MILLISECONDS / 1000} s`, "polling");
  pollTimer = setInterval(load, POLL_MILLISECONDS);
}

function follow() {
  let opened = false;
  openStream(
    "/v1/events",
    { phase: (data) => data && data.jobId && refreshJob(data.jobId) },
    {
      onOpen: () => {
        liveStatus("live", "live");
        // The stream starts from now: what changed between the first listing and now is listed again.
        if (!opened) load();
        opened = true;
      },
      onRetrying: () => liveStatus("reconnecting…", "retrying"),
      onUnavailable: startPolling,
    },
  );
}

function keepFiltersInUrl() {
  const query = new URLSearchParams();
  if (filters.phase.value) query.set("phase", filters.phase.value);
  if (filters.text.value.trim()) query.set("q", filters.text.value.trim());
  if (filters.tenant && filters.tenant.value.trim()) query.set("tenant", filters.tenant.value.trim());
  const search = query.toString();
  history.replaceState(null, "", search ? `/?${search}` : "/");
}

let tenantTimer = null;
filters.phase.addEventListener("change", () => { keepFiltersInUrl(); load(); });
filters.text.addEventListener("input", () => { keepFiltersInUrl(); render(); });
if (filters.tenant) {
  filters.tenant.addEventListener("input", () => {
    clearTimeout(tenantTimer);
    tenantTimer = setTimeout(() => { keepFiltersInUrl(); load(); }, 400);
  });
}
$("#filters").addEventListener("submit", (event) => event.preventDefault());
$("#load-more").addEventListener("click", loadMore);

load();
follow();
