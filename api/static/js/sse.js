// A job's live events: GET /v1/fine_tuning/jobs/{id}/events?stream=true read with fetch(), since an
// EventSource cannot send the Authorization header. A small parser of the text/event-stream format
// (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation) turns
// the body into messages; a dropped connection is resumed with Last-Event-ID, so no event is lost or
// shown twice. The server ends the stream after a finished job's last event.

import { ApiError, raw } from "./api.js";
import { TERMINAL } from "./format.js";

/** Split a text/event-stream into messages {id, event, data}; `feed` takes decoded text. */
export class SseParser {
  constructor(onMessage) {
    this.onMessage = onMessage;
    this.buffer = "";
    this.reset();
  }

  reset() { this.data = []; this.event = ""; this.id = null; }

  feed(text) {
    this.buffer += text;
    const lines = this.buffer.split(/\r\n|\r|\n/);
    this.buffer = lines.pop();  // the last line is not complete yet
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return;  // a comment: the keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && !value.includes("\0")) this.id = value;
  }

  dispatch() {
    if (this.data.length) this.onMessage({ id: this.id, event: this.event || "message", data: this.data.join("\n") });
    this.reset();
  }
}

/**
 * Follow a job's events until the stream ends (the job finished) or `signal` aborts.
 * onEvent(event) gets each event object (as in the list route); onState(text) the connection's state.
 */
export async function followEvents(jobId, { onEvent, onState, signal, lastId = null }) {
  let delay = 1000, finished = false;
  while (!signal.aborted) {
    try {
      onState?.("live");
      const extraHeaders = { Accept: "text/event-stream", ...(lastId ? { "Last-Event-ID": lastId } : {}) };
      const connection = new Watchdog(signal);
      connection.arm();  // the answer's headers must come in time too
      const response = await raw(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?stream=true`,
                                 { signal: connection.signal, extraHeaders });
      if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
        connection.disarm();
        onState?.("stopped: this service does not stream events");
        return;
      }
      delay = 1000;
      await read(response, connection, (m) => {
        lastId = m.id || lastId;
        const event = JSON.parse(m.data);
        finished ||= event.type === "message" && TERMINAL.includes(event.data?.status);
        onEvent(event);
      });
      if (finished) {
        onState?.("ended");
        return;  // the job's last event came: the server ends the stream there
      }
      throw new Error("the stream closed before the job finished");  // a restart, a proxy: resume
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status < 500 && err.status !== 429) {
        onState?.(`stopped: ${err.message}`);
        return;
      }
      onState?.("reconnecting");
      await sleep(delay, signal);
      delay = Math.min(delay * 2, 15000);
    }
  }
}

async function read(response, connection, onMessage) {
  const parser = new SseParser(onMessage);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      connection.arm();
      const { done, value } = await reader.read();
      if (done) break;
      parser.feed(value);
    }
  } finally {
    connection.disarm();
  }
}

// The server sends a keep-alive every DPO_STREAM_HEARTBEAT_S (15 s by default); a connection silent for
// much longer is dead without having said so (a sleeping laptop, a proxy that dropped it): drop it and resume.
const SILENCE_MS = 60_000;

/** One connection's abort signal: aborted with the page's, or after SILENCE_MS without a byte. */
class Watchdog {
  constructor(outer) {
    this.controller = new AbortController();
    this.signal = this.controller.signal;
    outer.addEventListener("abort", () => this.controller.abort(), { once: true });
    this.timer = null;
  }

  arm() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.controller.abort(), SILENCE_MS);
  }

  disarm() { clearTimeout(this.timer); }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}
