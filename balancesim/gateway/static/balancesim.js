// Shared by the test page and the admin dashboard: login, API calls, and a
// WebSocket that reconnects with `since` so no update is lost or shown twice.

const TOKEN_KEY = "balancesim.login";

export function saved() {
  const raw = sessionStorage.getItem(TOKEN_KEY);  // per tab: each tab may be another user
  return raw ? JSON.parse(raw) : null;
}

export function forget() {
  sessionStorage.removeItem(TOKEN_KEY);
}

export async function login(username, password) {
  const body = await api("POST", "/api/login", { username, password }, null);
  const who = { ...body, username };
  sessionStorage.setItem(TOKEN_KEY, JSON.stringify(who));
  return who;
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(`${status} ${code}: ${message}`);
    this.status = status;
    this.code = code;
  }
}

export async function api(method, path, body, token = saved()?.token) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (method !== "GET") headers["Idempotency-Key"] = crypto.randomUUID();
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = answer.error || { code: "http_error", message: response.statusText };
    throw new ApiError(response.status, error.code, error.message);
  }
  return answer;
}

// Decimal strings stay strings: comparisons go through 1e-8 units as BigInt.
export function units(text) {
  const [whole, frac = ""] = String(text).replace("-", "").split(".");
  const value = BigInt(whole) * 100000000n + BigInt((frac + "00000000").slice(0, 8));
  return String(text).startsWith("-") ? -value : value;
}

/**
 * A live session: `onMessage(message, replayed)` for every message in order,
 * `onState(state)` with connecting | live | reconnecting | offline.
 */
export class LiveSession {
  constructor(token, { onMessage, onState, onBalance, onUnauthorized }) {
    Object.assign(this, { token, onMessage, onState, onBalance, onUnauthorized });
    this.version = null;  // the last own version applied from the stream: `since` on reconnect
    this.userId = null;
    this.failures = 0;
    this.stopped = false;
    this.connect();
  }

  connect() {
    this.onState(this.failures === 0 && this.version === null ? "connecting" : this.failures > 2 ? "offline" : "reconnecting");
    const since = this.version === null ? "" : `&since=${this.version}`;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = (this.socket = new WebSocket(`${scheme}://${location.host}/ws?token=${encodeURIComponent(this.token)}${since}`));
    socket.onmessage = (event) => this.receive(JSON.parse(event.data));
    socket.onclose = (event) => this.closed(event.code);
  }

  receive(message) {
    if (message.type === "user_balance_init") {
      this.userId = message.user_id;
      if (this.version === null) this.version = message.version;
      this.failures = 0;
      this.stopPolling();
      this.onState("live");
      this.onBalance(message.balances, message.version, message.control_mode);
    } else if (message.type === "balance_update" && message.user_id === this.userId) {
      if (message.version <= this.version) return;  // already applied: never shown twice
      if (message.version > this.version + 1) {
        this.socket.close(4000, "gap");  // a gap: reconnect and let the server replay it
        return;
      }
      this.version = message.version;
    }
    this.onMessage(message);
  }

  closed(code) {
    if (this.stopped) return;
    if (code === 4001) {
      this.onUnauthorized();
      return;
    }
    this.failures += 1;
    this.onState(this.failures > 2 ? "offline" : "reconnecting");
    this.startPolling();
    const delay = Math.min(5000, 250 * 2 ** Math.min(this.failures, 5)) * (0.75 + Math.random() / 2);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  // While the socket is down, show the committed balance from the API.
  startPolling() {
    if (this.poller) return;
    this.poller = setInterval(async () => {
      try {
        const balance = await api("GET", "/api/balance", undefined, this.token);
        this.onBalance(balance.balances, balance.version, balance.control_mode, true);
      } catch (error) {
        if (error.status === 401) this.onUnauthorized();
      }
    }, 1000);
  }

  stopPolling() {
    clearInterval(this.poller);
    this.poller = null;
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.stopPolling();
    this.socket?.close(1000);
  }
}

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

export function showLogin(container, onLoggedIn) {
  const error = el("p", { class: "error", "data-testid": "login-error" });
  const username = el("input", { name: "username", "data-testid": "username", autocomplete: "username", required: "" });
  const password = el("input", { name: "password", type: "password", "data-testid": "password", autocomplete: "current-password", required: "" });
  const form = el("form", { "data-testid": "login-form", onsubmit: async (event) => {
    event.preventDefault();
    try {
      onLoggedIn(await login(username.value, password.value));
    } catch (failure) {
      error.textContent = failure.message;
    }
  } },
    el("label", {}, "Username ", username), el("label", {}, "Password ", password),
    el("button", { type: "submit", "data-testid": "login" }, "Log in"), error);
  container.replaceChildren(form);
}
