// Calls to the /v1 API as the signed-in user: the session cookie authenticates, the console header
// lets a POST through. A 401 (the session expired) sends the browser to log in again.

const CONSOLE_HEADER = { "X-Stillhouse-Console": "1" };

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `the API answered ${status}`);
    this.status = status;
    this.errors = (body && Array.isArray(body.errors)) ? body.errors : [];
  }
}

export function loginAgain() {
  const here = location.pathname + location.search;
  location.assign(`/login?next=${encodeURIComponent(here)}`);
}

export async function call(path, { method = "GET", body, contentType, signal } = {}) {
  const headers = { ...CONSOLE_HEADER, Accept: "application/json" };
  if (contentType) headers["Content-Type"] = contentType;
  let response;
  try {
    response = await fetch(path, { method, body, headers, signal, credentials: "same-origin" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, { message: `cannot reach the control plane (${error.message})` });
  }
  if (response.status === 401) {
    loginAgain();
    throw new ApiError(401, { message: "the session has ended: log in again" });
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { message: text.slice(0, 300) };
    }
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const jobPath = (jobId) => `/v1/jobs/${encodeURIComponent(jobId)}`;

// An EventSource on `path` whose named events go to `handlers` (parsed JSON data). `onUnavailable`
// runs when the browser gives the stream up for good (an error status such as 404: it does not retry
// those); a dropped connection is retried by the browser itself, from the last event id.
export function openStream(path, handlers, { onOpen, onUnavailable, onRetrying } = {}) {
  const source = new EventSource(path, { withCredentials: true });
  for (const [name, handle] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => {
      let data;
      try {
        data = JSON.parse(event.data);
      } catch {
        return;
      }
      handle(data, event);
    });
  }
  source.addEventListener("open", () => onOpen && onOpen());
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      if (onUnavailable) onUnavailable();
    } else if (onRetrying) {
      onRetrying();
    }
  });
  return source;
}
