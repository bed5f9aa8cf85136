// The job page: the JobView drawn once, then kept live from the job's event stream (phase, progress
// and error events, replayed from the start): the phase, the stage timeline, the running stage's
// progress and the training curves. A phase change fetches the JobView again.

import { call, jobPath, openStream } from "./api.js";
import { lineChart } from "./charts.js";
import { $, el, liveStatus, replaceChildren, show } from "./dom.js";
import {
  TERMINAL_PHASES, formatDuration, formatTime, jobDuration, phaseBadge, secondsBetween,
} from "./format.js";
import {
  renderArtifact, renderCost, renderEvaluation, renderSamples, renderTraining,
} from "./job_sections.js";

const STAGES = [
  ["prompts", "Prompts"],
  ["teacher", "Teacher answers"],
  ["train", "Training"],
  ["evaluate", "Evaluation"],
];
const STAGE_OF_PHASE = { Prompts: "prompts", Teacher: "teacher", Training: "train", Evaluating: "evaluate" };
const LOSS_METRICS = ["loss", "kd", "ce"];
const CURVE_METRICS = [...LOSS_METRICS, "learning_rate"];
const ARTIFACTS = ["student", "baseline", "report"];
const TRAINING_MESSAGE = /^training the ([\w.-]+):/;

const jobId = $("#job-page").dataset.jobId;
let job = null;
let stream = null;
let artifactsShown = false;
const progress = {}; // stage -> the last progress event's data
const eventErrors = []; // messages of `error` events
const curves = new Map(); // model -> {metric -> [[step, value]]}
let curvesComplete = false; // the job's summary gave every reported step: live progress adds nothing

// --- header and timeline --------------------------------------------------------------------------

function renderHeader() {
  $("#job-name").textContent = job.name;
  phaseBadge($("#job-phase"), job.phase);
  $("#job-owner").textContent = job.owner || "";
  $("#job-tenant").textContent = job.tenant;
  const created = $("#job-created");
  created.textContent = formatTime(job.createdAt);
  created.setAttribute("datetime", job.createdAt);
  $("#job-duration").textContent = jobDuration(job);
  $("#job-message").textContent = job.message || "";
  replaceChildren($("#job-labels"), Object.entries(job.labels || {}).map(([key, value]) => el("li", { text: `${key}=${value}` })));
  const terminal = TERMINAL_PHASES.has(job.phase);
  const cancel = $("#cancel-job");
  cancel.hidden = terminal;
  cancel.disabled = job.cancelRequested;
  cancel.textContent = job.cancelRequested ? "Cancelling…" : "Cancel job";
}

function latestStep(stage) {
  const steps = (job.steps || []).filter((step) => step.stage === stage);
  return steps.length ? steps.reduce((a, b) => (b.attempt >= a.attempt ? b : a)) : null;
}

function progressBar(state) {
  const bar = el("div", { class: "bar", role: "progressbar" });
  const fill = el("div", { class: "fill" });
  if (state && state.total > 0) {
    const share = Math.min(1, state.done / state.total);
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    bar.setAttribute("aria-valuenow", String(Math.round(share * 100)));
  } else {
    bar.classList.add("indeterminate");
  }
  bar.append(fill);
  return bar;
}

function progressText(state) {
  if (!state) return "";
  const count = state.total > 0 ? `${state.done} / ${state.total} ${state.unit || ""}` : (state.done ? `${state.done} ${state.unit || ""}` : "");
  return [state.message, count.trim()].filter(Boolean).join(" · ");
}

function renderTimeline() {
  const current = STAGE_OF_PHASE[job.phase];
  replaceChildren(
    $("#timeline"),
    STAGES.map(([stage, title]) => {
      const step = latestStep(stage);
      const running = step ? step.state === "running" : stage === current;
      const state = step ? step.state : stage === current ? "starting" : "waiting";
      const duration = step ? formatDuration(secondsBetween(step.startedAt, step.finishedAt)) : "";
      const details = [
        step && step.attempt > 1 ? `attempt ${step.attempt}` : "",
        step ? `started ${formatTime(step.startedAt)}` : "",
        duration ? (step.finishedAt ? `took ${duration}` : `running for ${duration}`) : "",
      ].filter(Boolean);
      return el(
        "li",
        { class: `stage state-${state}`, dataset: { stage, state } },
        el("div", { class: "stage-head" }, el("span", { class: "stage-name", text: title }), el("span", { class: "stage-state", text: state })),
        el("div", { class: "stage-details", text: details.join(" · ") }),
        running && !TERMINAL_PHASES.has(job.phase) ? progressBar(progress[stage]) : null,
        running ? el("div", { class: "stage-progress", text: progressText(progress[stage]) }) : null,
        step && step.error ? el("div", { class: "error", text: step.error }) : null,
      );
    }),
  );
}

// A failure is said once: the job's reason in the banner, each stage's error on its stage, and only
// the error events that say something else in the list.
function renderErrors() {
  const said = new Set(job ? [job.message, ...(job.steps || []).map((step) => step.error)] : []);
  const messages = [...new Set(eventErrors)].filter((message) => !said.has(message));
  const list = $("#job-errors");
  replaceChildren(list, messages.map((message) => el("li", { text: message })));
  list.hidden = messages.length === 0;
  const failed = job && job.phase === "Failed";
  show($("#job-error"), failed ? `The job failed: ${job.message || "no reason given"}` : "");
  $("#job-message").hidden = failed;
}

// --- curves ---------------------------------------------------------------------------------------

function addPoint(model, metric, step, value) {
  if (!curves.has(model)) curves.set(model, {});
  const series = curves.get(model);
  const points = (series[metric] ||= []);
  const last = points[points.length - 1];
  if (last && last[0] === step) last[1] = value;
  else if (!last || last[0] < step) points.push([step, value]);
}

function addPoints(model, step, metrics) {
  for (const metric of CURVE_METRICS) {
    if (typeof metrics[metric] === "number") addPoint(model, metric, step, metrics[metric]);
  }
}

// Live progress samples the steps (an event a second at most); once training is done the job's summary
// has every step it reported, and replaces the sample.
function useCompleteCurves(points) {
  curves.clear();
  for (const point of points) addPoints(point.model, point.step, point.metrics);
  curvesComplete = true;
}

let curvesPending = false;
function renderCurves() {
  if (curvesPending) return;
  curvesPending = true;
  requestAnimationFrame(() => {
    curvesPending = false;
    const loss = [];
    const learningRate = [];
    for (const [model, series] of curves) {
      for (const metric of LOSS_METRICS) if (series[metric]) loss.push({ name: `${model} ${metric}`, points: series[metric] });
      if (series.learning_rate) learningRate.push({ name: `${model} learning rate`, points: series.learning_rate });
    }
    const waiting = TERMINAL_PHASES.has(job && job.phase) ? "No training steps were reported." : "No training steps yet.";
    lineChart($("#chart-loss .plot"), loss, { emptyText: waiting });
    lineChart($("#chart-lr .plot"), learningRate, { emptyText: waiting });
  });
}

// --- the JobView and the stream -------------------------------------------------------------------

function renderJob() {
  renderHeader();
  renderTimeline();
  renderErrors();
  const summary = job.summary;
  if (!curvesComplete && summary && summary.training && summary.training.curve.length) useCompleteCurves(summary.training.curve);
  renderCost($("#cost-table"), summary);
  renderTraining($("#training-table"), summary);
  if (summary && summary.evaluation) {
    renderEvaluation($("#evaluation-table"), $("#headline"), summary.evaluation);
    renderSamples($("#samples-section"), $("#samples"), summary.evaluation.samples);
  } else if (TERMINAL_PHASES.has(job.phase)) {
    $("#headline").textContent = "The job ended without an evaluation.";
  }
  if (TERMINAL_PHASES.has(job.phase) && !artifactsShown) {
    artifactsShown = true;
    showArtifacts();
  }
  renderCurves();
}

async function showArtifacts() {
  const found = await Promise.all(
    ARTIFACTS.map(async (name) => {
      try {
        return [name, await call(`${jobPath(jobId)}/artifacts/${name}`)];
      } catch (error) {
        return [name, { error: error.status === 404 ? `No ${name}: ${error.message}` : `Cannot list the ${name}: ${error.message}` }];
      }
    }),
  );
  replaceChildren($("#artifacts"), found.map(([name, links]) => renderArtifact(jobId, name, links)));
}

let refetchTimer = null;
function refetchSoon() {
  clearTimeout(refetchTimer);
  refetchTimer = setTimeout(refetch, 150);
}

async function refetch() {
  try {
    job = await call(jobPath(jobId));
    show($("#job-error"), "");
    renderJob();
  } catch (error) {
    show($("#job-error"), `Cannot load the job: ${error.message}`);
  }
}

function onPhase(data) {
  if (job) {
    job.phase = data.phase;
    job.message = data.message;
    renderHeader();
    renderTimeline();
  }
  if (TERMINAL_PHASES.has(data.phase)) {
    // The stream ends here; the browser would reconnect and wait for events that never come.
    stream.close();
    liveStatus("ended", "ended");
  }
  refetchSoon();
}

function onProgress(data) {
  progress[data.stage] = data;
  if (data.stage === "train" && data.metrics && !curvesComplete) {
    const match = TRAINING_MESSAGE.exec(data.message || "");
    const model = match ? match[1] : "student";
    addPoints(model, data.done, data.metrics);
    renderCurves();
  }
  if (job) renderTimeline();
}

function onError(data) {
  eventErrors.push(data.message);
  renderErrors();
}

function follow() {
  stream = openStream(
    `${jobPath(jobId)}/events`,
    { phase: onPhase, progress: onProgress, error: onError },
    {
      onOpen: () => liveStatus("live", "live"),
      onRetrying: () => liveStatus("reconnecting…", "retrying"),
      onUnavailable: () => liveStatus("not live: reload to update", "unavailable"),
    },
  );
}

async function cancelJob() {
  if (!window.confirm(`Cancel ${job.name} (${job.id})? The running stage is stopped; this cannot be undone.`)) return;
  const button = $("#cancel-job");
  button.disabled = true;
  try {
    job = await call(`${jobPath(jobId)}:cancel`, { method: "POST" });
    renderJob();
  } catch (error) {
    button.disabled = false;
    show($("#job-error"), `Cannot cancel the job: ${error.message}`);
  }
}

$("#cancel-job").addEventListener("click", cancelJob);
setInterval(() => {
  if (job && !TERMINAL_PHASES.has(job.phase)) {
    $("#job-duration").textContent = jobDuration(job);
    renderTimeline();
  }
}, 1000);

await refetch();
follow();
