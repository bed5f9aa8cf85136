// The parts of the job page drawn from its JobView: evaluation, held-out answers, teacher ledger and
// cost, prompts and training, artifacts. Pure rendering into the given elements.

import { el, replaceChildren } from "./dom.js";
import { formatCount, formatNumber, formatUsd } from "./format.js";

export const EVALUATION_ROWS = [
  ["uniform", "uniform (reference)"],
  ["unigram", "unigram (reference)"],
  ["baseline", "untrained student"],
  ["controlSft", "SFT control"],
  ["student", "student"],
  ["teacher", "teacher"],
];
export const METRICS = [
  ["kl", "KL to teacher ↓"],
  ["top1_agreement", "top-1 agreement ↑"],
  ["perplexity", "perplexity ↓"],
  ["token_f1", "token F1 ↑"],
  ["exact_match", "exact match ↑"],
  ["repeated_4grams", "repeated 4-grams ↓"],
];

export function renderEvaluation(table, headline, evaluation) {
  if (!evaluation) return;
  // In the words the CLI, the report and the model card use: the summary carries them.
  headline.textContent = [evaluation.headline, evaluation.controlSftLeadSentence].filter(Boolean).join(" ");
  const rows = EVALUATION_ROWS.filter(([key]) => evaluation[key] && Object.keys(evaluation[key]).length > 0);
  const known = new Set(METRICS.map(([key]) => key));
  const extra = [...new Set(rows.flatMap(([key]) => Object.keys(evaluation[key])))]
    .filter((name) => !known.has(name))
    .sort();
  const columns = [...METRICS, ...extra.map((name) => [name, name])];
  replaceChildren(
    table,
    el("thead", {}, el("tr", {}, el("th", { text: "model" }), columns.map(([, title]) => el("th", { class: "num", text: title })))),
    el(
      "tbody",
      {},
      rows.map(([key, title]) =>
        el(
          "tr",
          { dataset: { row: key }, class: key === "student" ? "highlight" : "" },
          el("th", { text: title }),
          columns.map(([metric]) => el("td", { class: "num", dataset: { metric }, text: formatNumber(evaluation[key][metric]) })),
        ),
      ),
    ),
  );
  table.hidden = false;
}

function answer(title, model, text) {
  const empty = !text;
  return el(
    "div",
    { class: "answer", dataset: { model } },
    el("h4", { text: title }),
    el("pre", { class: empty ? "answer-text empty" : "answer-text", text: empty ? "(empty answer)" : text }),
  );
}

export function renderSamples(section, container, samples) {
  if (!samples || samples.length === 0) return;
  const withControl = samples.some((sample) => sample.controlSft !== null && sample.controlSft !== undefined);
  replaceChildren(
    container,
    samples.map((sample) =>
      el(
        "article",
        { class: "sample", dataset: { promptId: sample.promptId } },
        el("p", { class: "prompt" }, el("span", { class: "prompt-label", text: "Prompt" }), el("span", { text: sample.prompt })),
        el(
          "div",
          { class: withControl ? "answers four" : "answers" },
          answer("Teacher", "teacher", sample.teacher),
          answer("Untrained student", "baseline", sample.baseline),
          answer("Student", "student", sample.student),
          withControl ? answer("SFT control", "controlSft", sample.controlSft) : null,
        ),
      ),
    ),
  );
  section.hidden = false;
}

function facts(table, rows) {
  const shown = rows.filter(([, value]) => value !== null && value !== undefined && value !== "");
  replaceChildren(
    table,
    el("tbody", {}, shown.map(([name, value]) => el("tr", {}, el("th", { text: name }), el("td", { class: "num", text: value })))),
  );
}

export function renderCost(table, summary) {
  if (!summary) {
    facts(table, [["so far", "nothing spent"]]);
    return;
  }
  const teacher = summary.teacher;
  const generation = summary.prompts && summary.prompts.generation;
  const cost = summary.cost;
  facts(table, [
    ["teacher requests", teacher && `${formatCount(teacher.requests)} (${formatCount(teacher.cachedRequests)} cached)`],
    ["teacher prompt tokens", teacher && formatCount(teacher.promptTokens)],
    ["teacher completion tokens", teacher && formatCount(teacher.completionTokens)],
    ["answers", teacher && formatCount(teacher.answers)],
    ["failed prompts", teacher && formatCount(teacher.failedPrompts)],
    ["stopped because", teacher && teacher.stoppedReason],
    ["teacher cost", teacher && formatUsd(teacher.costUsd)],
    ["prompt generation", generation && `${formatCount(generation.requests)} requests, ${formatUsd(generation.costUsd)}`],
    ["GPU hours", cost && formatNumber(cost.gpuHours, 3)],
    ["total cost", cost && formatUsd(cost.totalUsd)],
  ]);
}

export function renderTraining(table, summary) {
  const prompts = summary && summary.prompts;
  const training = summary && summary.training;
  const removed = prompts && Object.entries(prompts.removedByRule || {}).map(([rule, count]) => `${rule} ${count}`).join(", ");
  const final = training && Object.entries(training.finalMetrics || {}).map(([name, value]) => `${name} ${formatNumber(value)}`).join(", ");
  if (!prompts && !training) {
    facts(table, [["so far", "the prompts stage has not finished"]]);
    return;
  }
  facts(table, [
    ["training prompts", prompts && formatCount(prompts.train)],
    ["held-out prompts", prompts && formatCount(prompts.holdout)],
    ["prompts collected", prompts && formatCount(prompts.collected)],
    ["removed", removed],
    ["training steps", training && formatCount(training.steps)],
    ["training tokens", training && formatCount(training.tokens)],
    ["final metrics", final],
  ]);
}

function formatBytes(size) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = size;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

export function fileUrl(jobId, name, path) {
  const encoded = path.split("/").map(encodeURIComponent).join("/");
  return `/v1/jobs/${encodeURIComponent(jobId)}/artifacts/${name}/files/${encoded}`;
}

// links: ArtifactLinks, or {error: message} when the artifact could not be listed.
export function renderArtifact(jobId, name, links) {
  const heading = el("h3", { text: name });
  if (links.error) return el("div", { class: "artifact", dataset: { artifact: name } }, heading, el("p", { class: "hint", text: links.error }));
  return el(
    "div",
    { class: "artifact", dataset: { artifact: name } },
    heading,
    el(
      "table",
      { class: "files" },
      el(
        "tbody",
        {},
        links.files.map((file) =>
          el(
            "tr",
            {},
            el("td", {}, el("a", { href: fileUrl(jobId, name, file.path), download: file.path.split("/").pop(), text: file.path })),
            el("td", { class: "num", text: formatBytes(file.sizeBytes) }),
            el("td", {}, el("code", { title: file.sha256, text: `sha256 ${file.sha256.slice(0, 12)}…` })),
          ),
        ),
      ),
    ),
  );
}
