// How the console writes times, durations, money and numbers, and the look of a phase.

export const TERMINAL_PHASES = new Set(["Succeeded", "Failed", "Cancelled"]);

export function formatTime(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  return date.toLocaleString(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return "";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  const h = Math.floor(m / 60);
  return `${h} h ${m % 60} min`;
}

export function secondsBetween(startIso, endIso) {
  if (!startIso) return null;
  const end = endIso ? new Date(endIso) : new Date();
  return (end.getTime() - new Date(startIso).getTime()) / 1000;
}

export function jobDuration(job) {
  return formatDuration(secondsBetween(job.createdAt, TERMINAL_PHASES.has(job.phase) ? job.updatedAt : null));
}

export function formatUsd(value) {
  if (value === null || value === undefined) return "";
  return `$${Number(value).toFixed(value !== 0 && Math.abs(value) < 0.01 ? 4 : 2)}`;
}

export function formatCount(value) {
  if (value === null || value === undefined) return "";
  return Number(value).toLocaleString("en-US");
}

export function formatNumber(value, digits = 4) {
  if (value === null || value === undefined || value === "") return "–";
  const number = Number(value);
  if (!Number.isFinite(number)) return String(value);
  if (number !== 0 && (Math.abs(number) >= 1e5 || Math.abs(number) < 1e-3)) return number.toExponential(2);
  return String(Number(number.toPrecision(digits)));
}

export function formatPercent(value) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return "–";
  return `${Number(value).toFixed(1)}%`;
}

export function phaseBadge(badge, phase) {
  badge.textContent = phase;
  badge.dataset.phase = phase;
  badge.className = `badge phase-${String(phase).toLowerCase()}`;
}
