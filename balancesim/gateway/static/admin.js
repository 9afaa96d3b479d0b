// Every account at once, kept live by admin_balance_monitor and trading_control_update.
import { LiveSession, api, el, forget, saved, showLogin } from "/balancesim.js";

const app = document.getElementById("app");

async function start(who) {
  if (who.role === "user") {
    app.replaceChildren(el("p", { class: "error", "data-testid": "admins-only" }, "The dashboard is for admins and superadmins."),
      el("button", { onclick: () => { forget(); location.reload(); } }, "Log in as someone else"));
    return;
  }
  const status = el("span", { class: "status", "data-testid": "ws-status", "data-state": "connecting" }, "connecting");
  const body = el("tbody");
  const feed = el("ul", { class: "log", "data-testid": "feed" });
  const rows = new Map();
  app.replaceChildren(
    el("header", {}, el("span", {}, `${who.username} (${who.role})`), status, el("a", { href: "/test-balance-sync.html" }, "test page")),
    el("table", { "data-testid": "accounts" },
      el("thead", {}, el("tr", {}, ...["user", "role", "USDT", "BTC", "ETH", "version", "mode"].map((h) => el("th", {}, h)))), body),
    el("section", {}, el("h2", {}, "Changes"), feed));

  const row = (user) => {
    let tr = rows.get(user.user_id);
    if (!tr) {
      tr = el("tr", { "data-user": user.user_id });
      rows.set(user.user_id, tr);
      body.append(tr);
    }
    tr.replaceChildren(el("td", {}, user.username), el("td", {}, user.role),
      ...["USDT", "BTC", "ETH"].map((a) => el("td", { "data-testid": `cell-${user.user_id}-${a}` }, user.balances[a])),
      el("td", { "data-testid": `cell-${user.user_id}-version` }, String(user.version)),
      el("td", { "data-testid": `cell-${user.user_id}-mode` }, user.control_mode));
    tr.user = user;
    tr.classList.add("flash");
    setTimeout(() => tr.classList.remove("flash"), 600);
  };
  const reload = async () => (await api("GET", "/api/users")).users.forEach(row);
  await reload();

  new LiveSession(who.token, {
    onState: (value) => { status.dataset.state = value; status.textContent = value; },
    onUnauthorized: () => { forget(); location.reload(); },
    onBalance: () => reload(),
    onMessage: (message) => {
      const known = rows.get(message.user_id)?.user;
      if (message.type === "admin_balance_monitor") {
        feed.prepend(el("li", {}, `${message.ts} ${message.username}: ${message.change_type} ${message.change} ${message.asset} → ${message.balance} (v${message.version})`));
        if (!known) return reload();
        if (message.version > known.version) row({ ...known, version: message.version, balances: { ...known.balances, [message.asset]: message.balance } });
      } else if (message.type === "trading_control_update") {
        feed.prepend(el("li", {}, `${message.ts} user #${message.user_id}: control mode → ${message.mode} (by #${message.set_by})`));
        if (known) row({ ...known, control_mode: message.mode });
      }
    },
  });
}

const who = saved();
if (who) start(who);
else showLogin(app, start);
