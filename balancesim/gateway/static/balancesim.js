// Shared by the test page and the admin dashboard: login, API calls, and a
// WebSocket that reconnects with `since` so no update is lost or shown twice.

const TOKEN_KEY = "balancesim.login";
const NOTICE_KEY = "balancesim.notice";  // shown once on the login form after a reload
const USERNAME_KEY = "balancesim.username";  // the login form's username after a reload
export const EXPIRED = "Your session has expired; please log in again.";
export const LOGGED_OUT = "You have logged out.";
export const ACCOUNT_CHANGED = "An administrator changed this account's role; please log in again.";
export const ACCOUNT_DISABLED = "An administrator disabled this account.";
// What the gateway says when it closes a session with 4001 (_fanout.py), in the user's words.
const CLOSE_REASONS = {
  "the account's role changed: log in again": ACCOUNT_CHANGED,
  "the account was disabled": ACCOUNT_DISABLED,
};

export function saved() {
  const raw = sessionStorage.getItem(TOKEN_KEY);  // per tab: each tab may be another user
  return raw ? JSON.parse(raw) : null;
}

export function forget() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/**
 * The stored token was refused (HTTP 401, or WebSocket close 4001 with the server's
 * `reason`): drop it and reload, so that the page starts afresh on the login form
 * with a notice that says why, and the username filled in.
 */
let expiring = false;
export function expire(reason) {
  if (expiring) return;
  expiring = true;
  leave(CLOSE_REASONS[reason] ?? EXPIRED);
}

function leave(notice) {
  const username = saved()?.username;
  forget();
  sessionStorage.setItem(NOTICE_KEY, notice);
  if (username) sessionStorage.setItem(USERNAME_KEY, username);
  location.reload();
}

/**
 * The Log out button: the server revokes the token at once (POST /api/logout), so a
 * copy of it is worthless too. Stop `session` first (the server closes it with 4001,
 * which is no expiry). The page forgets the token whatever the answer: a network
 * failure, or a token already refused, still logs this tab out.
 */
export async function logout(session) {
  session?.stop();
  expiring = true;  // a 401 racing the click must not turn into "expired"
  const token = saved()?.token;
  if (token) {
    try {
      await fetch("/api/logout", { method: "POST", headers: { Authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(5000) });
    } catch {
      // offline or timed out: forget locally all the same
    }
  }
  leave(LOGGED_OUT);
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
    this.detail = message;  // the server's human sentence alone
  }
}

export async function api(method, path, body, token = saved()?.token) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (method !== "GET") headers["Idempotency-Key"] = crypto.randomUUID();
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401 && token && token === saved()?.token) expire();
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

// 1e-8 units (BigInt) back to a plain decimal string, signed: 150000000n → "1.5".
export function decimal(value) {
  const sign = value < 0n ? "-" : "";
  const abs = value < 0n ? -value : value;
  const frac = String(abs % 100000000n).padStart(8, "0").replace(/0+$/, "");
  return `${sign}${abs / 100000000n}${frac ? `.${frac}` : ""}`;
}

// PROTOCOL.md's decided_by in plain words.
export function decidedBy(value) {
  if (value === "market") return "decided by the market";
  if (value?.startsWith("control_mode:")) return `decided by control mode: ${value.slice("control_mode:".length)}`;
  if (value?.startsWith("admin_force:")) return `decided by admin force (admin #${value.slice("admin_force:".length)})`;
  return value ? `decided by ${value}` : "";
}

export function secondsLeft(trade) {
  return Math.max(0, (Date.parse(trade.expires_at) - Date.now()) / 1000);
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
    socket.onopen = () => { socket.opened = true; };
    socket.onmessage = (event) => this.receive(JSON.parse(event.data));
    socket.onclose = (event) => this.closed(event.code, socket.opened, event.reason);
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

  closed(code, opened, reason) {
    if (this.stopped) return;
    if (code === 4001) {
      this.onUnauthorized(reason);
      return;
    }
    // A refused handshake (a 401 for a stale token) reaches a browser only as 1006:
    // ask the API at once whether the token still stands.
    if (!opened) this.probe();
    this.failures += 1;
    this.onState(this.failures > 2 ? "offline" : "reconnecting");
    this.startPolling();
    const delay = Math.min(5000, 250 * 2 ** Math.min(this.failures, 5)) * (0.75 + Math.random() / 2);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  // While the socket is down, show the committed balance from the API.
  startPolling() {
    if (this.poller) return;
    this.poller = setInterval(() => this.probe(), 1000);
  }

  async probe() {
    try {
      const balance = await api("GET", "/api/balance", undefined, this.token);
      if (!this.stopped) this.onBalance(balance.balances, balance.version, balance.control_mode, true);
    } catch (error) {
      if (error.status === 401 && !this.stopped) this.onUnauthorized();
    }
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
  const notice = el("p", { class: "notice", "data-testid": "login-notice" }, sessionStorage.getItem(NOTICE_KEY) || "");
  sessionStorage.removeItem(NOTICE_KEY);
  if (!notice.textContent) notice.hidden = true;
  const error = el("p", { class: "error", "data-testid": "login-error" });
  const username = el("input", { name: "username", "data-testid": "username", autocomplete: "username", required: "",
    value: sessionStorage.getItem(USERNAME_KEY) || "" });
  sessionStorage.removeItem(USERNAME_KEY);
  const password = el("input", { name: "password", type: "password", "data-testid": "password", autocomplete: "current-password", required: "" });
  const form = el("form", { class: "login", "data-testid": "login-form", onsubmit: async (event) => {
    event.preventDefault();
    try {
      onLoggedIn(await login(username.value, password.value));
    } catch (failure) {
      // A refused login in the server's words ("this account is disabled"), as a sentence.
      const detail = failure.status === 401 && failure.detail;
      error.textContent = detail ? `${detail[0].toUpperCase()}${detail.slice(1)}.` : failure.message;
    }
  } },
    notice, el("label", {}, "Username ", username), el("label", {}, "Password ", password),
    el("button", { type: "submit", "data-testid": "login" }, "Log in"), error);
  container.replaceChildren(form);
}
