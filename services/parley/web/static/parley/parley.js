// Parley's live client: progressive enhancement of the server-rendered pages, which work
// without it. One WebSocket per page; no dependencies and no build step.
//
// The protocol and the client algorithm it follows are in docs/protocol.md. In short:
// every conversation's messages are numbered by `seq` without gaps, so the client holds
// messages by seq, renders them in seq order, drops any seq it already has, and asks the
// server to `resume` from the highest seq up to which it holds everything whenever it
// reconnects or sees a gap. Sends carry a fresh `client_id`, kept until their `ack` and
// sent again (same id) after a reconnect; the server never stores one twice.
//
// Security: message text is only ever put in the page as text nodes (never innerHTML);
// links are <a> elements built from http(s) URLs that the URL parser accepted.

const API = "/api/v1";
const BACKOFF_BASE_MS = 500; // full jitter: sleep random(0, min(CAP, BASE * 2 ** attempt))
const BACKOFF_CAP_MS = 30000;
const STABLE_MS = 10000; // a socket up this long resets the backoff
const IDLE_PING_MS = 25000; // an application ping after this long without a frame...
const PONG_TIMEOUT_MS = 10000; // ...and a reconnect if nothing answers it
const TYPING_SEND_MS = 3000; // the server relays one `typing` per 2.5 s; send every 3 s
const TYPING_SHOW_MS = 4500; // show "X is typing…" this long after the last one
const READ_DELAY_MS = 200; // batch the `read` frames of a burst of messages
const UNAVAILABLE_RETRY_MS = 1500;
const UNAVAILABLE_MAX_TRIES = 5;
const NEAR_BOTTOM_PX = 120;
const HISTORY_PAGE = 200;

// --- small helpers ---------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children); // strings become text nodes
  return node;
}

/** A random UUID; crypto.randomUUID exists only in secure contexts (https, localhost). */
export function newClientId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"). */
export function backoffDelay(attempt) {
  return Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
}

async function getJSON(path) {
  const response = await fetch(path, {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

/** The realtime URLs of the page: empty means this origin's /ws/chat/; several URLs
 * (comma-separated) are tried in turn on reconnects. */
export function realtimeUrls(configured) {
  const urls = (configured || "").split(/[\s,]+/).filter(Boolean);
  if (urls.length) return urls;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return [`${scheme}//${location.host}/ws/chat/`];
}

// --- message text: text nodes, and links for http(s) URLs only -------------------------

const URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/gi;
const CLOSERS = { ")": "(", "]": "[", "}": "{" };

/** Drop punctuation that ends a sentence rather than the URL ("see https://x.org/a)."). */
function trimUrl(raw) {
  let url = raw;
  for (;;) {
    const last = url.at(-1);
    if (".,;:!?*'\"".includes(last)) {
      url = url.slice(0, -1);
    } else if (last in CLOSERS) {
      const open = url.split(CLOSERS[last]).length - 1;
      const close = url.split(last).length - 1;
      if (close <= open) break;
      url = url.slice(0, -1);
    } else {
      break;
    }
  }
  return url;
}

/** Replace `parent`'s content by `text`, with http(s) URLs as safe links. */
export function renderText(parent, text) {
  const nodes = [];
  let done = 0;
  for (const match of text.matchAll(URL_RE)) {
    const raw = trimUrl(match[0]);
    let url;
    try {
      url = new URL(raw);
    } catch {
      continue;
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") continue;
    if (match.index > done) nodes.push(text.slice(done, match.index));
    nodes.push(h("a", { href: url.href, rel: "noopener noreferrer nofollow", target: "_blank" }, raw));
    done = match.index + raw.length;
  }
  nodes.push(text.slice(done));
  parent.replaceChildren(...nodes);
}

// --- times: shown in the reader's time zone --------------------------------------------

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "numeric", minute: "2-digit" });
const dateFormat = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "short" });
const dayKey = (d) => `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`;

function messageDate(li) {
  const time = li?.querySelector("time[datetime]");
  if (!time) return null;
  const date = new Date(time.dateTime);
  return Number.isNaN(date.getTime()) ? null : date;
}

/** Show the message's time, with the date when it is the first of its day on the page. */
function refreshTime(li) {
  const time = li?.querySelector("time[datetime]");
  const date = messageDate(li);
  if (!time || !date) return;
  const previous = messageDate(li.previousElementSibling);
  const showDate = !previous || dayKey(previous) !== dayKey(date);
  time.textContent = (showDate ? `${dateFormat.format(date)}, ` : "") + timeFormat.format(date);
  time.title = fullFormat.format(date);
}

// --- the connection ----------------------------------------------------------------------

/**
 * One WebSocket that comes back: exponential backoff with full jitter, at once (jittered)
 * after a planned close (1011 resync, 1012 restart), never after 4401/4403. Several URLs
 * are tried in turn. States: connecting → live (after `hello`) → reconnecting → live…,
 * or stopped.
 */
class Connection {
  constructor({ urls, onFrame, onState, onStop }) {
    this.urls = urls;
    this.index = 0;
    this.onFrame = onFrame;
    this.onState = onState;
    this.onStop = onStop;
    this.ws = null;
    this.state = "connecting";
    this.attempt = 0;
    this.retryTimer = null;
    this.stableTimer = null;
    this.lastFrameAt = 0;
    this.pingSentAt = 0;
    this.suspended = false; // page hidden in the back/forward cache
    setInterval(() => this.checkAlive(), 5000);
    addEventListener("online", () => this.retryNow());
    addEventListener("pagehide", () => this.suspend());
    addEventListener("pageshow", (event) => {
      if (event.persisted) this.resumeAfterCache();
    });
  }

  get live() {
    return this.state === "live" && this.ws?.readyState === WebSocket.OPEN;
  }

  start() {
    this.connect();
  }

  connect() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.state === "stopped" || this.suspended) return;
    const url = this.urls[this.index % this.urls.length];
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (error) {
      console.warn("parley: cannot open", url, error);
      this.closed(1006);
      return;
    }
    this.ws = ws;
    ws.addEventListener("message", (event) => {
      if (this.ws !== ws) return;
      this.lastFrameAt = performance.now();
      this.pingSentAt = 0;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame?.type === "hello") this.helloed();
      this.onFrame(frame);
    });
    ws.addEventListener("close", (event) => {
      if (this.ws !== ws) return; // replaced or dropped by us already
      this.ws = null;
      this.closed(event.code);
    });
  }

  helloed() {
    clearTimeout(this.stableTimer);
    this.stableTimer = setTimeout(() => {
      this.attempt = 0;
    }, STABLE_MS);
    this.setState("live");
  }

  closed(code) {
    clearTimeout(this.stableTimer);
    if (this.state === "stopped" || this.suspended) return;
    if (code === 4401 || code === 4403) {
      this.setState("stopped");
      this.onStop(code);
      return;
    }
    if (code === 1011 || code === 1012) this.attempt = 0; // planned: come back quickly
    this.attempt += 1;
    this.index += 1; // the next URL, if there are several
    this.setState("reconnecting");
    this.retryTimer = setTimeout(() => this.connect(), backoffDelay(this.attempt));
  }

  /** Drop the socket without waiting for a closing handshake (it may be dead). */
  drop() {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
    }
  }

  retryNow() {
    if (this.state !== "reconnecting") return;
    this.attempt = 0;
    this.connect();
  }

  suspend() {
    this.suspended = true;
    clearTimeout(this.retryTimer);
    this.drop();
  }

  resumeAfterCache() {
    this.suspended = false;
    if (this.state === "stopped") return;
    this.setState("reconnecting");
    this.connect();
  }

  /** A socket that has said nothing for a while gets a ping; no answer, a reconnect. */
  checkAlive() {
    if (!this.live) return;
    const now = performance.now();
    if (this.pingSentAt && now - this.pingSentAt > PONG_TIMEOUT_MS) {
      this.drop();
      this.closed(1006);
    } else if (!this.pingSentAt && now - this.lastFrameAt > IDLE_PING_MS) {
      this.pingSentAt = now;
      this.send({ type: "ping" });
    }
  }

  /** Write a frame; false when there is no live socket to write it to. */
  send(frame) {
    if (!this.live) return false;
    try {
      this.ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.onState(state);
  }
}

// --- the connection status line ------------------------------------------------------------

class StatusLine {
  constructor(node, connection) {
    this.node = node;
    this.connection = connection;
  }

  render(state, detail) {
    const root = document.documentElement;
    root.dataset.connection = state;
    if (!this.node) return;
    // The first connection attempt stays quiet; later ones are shown.
    const show = state === "stopped" || state === "reconnecting";
    this.node.hidden = !show;
    if (!show) {
      this.node.replaceChildren();
      return;
    }
    this.node.dataset.state = state;
    if (state === "stopped") {
      this.node.replaceChildren(detail || "Live updates are off.");
      return;
    }
    const retry = h("button", { type: "button", className: "button-link" }, "Retry now");
    retry.addEventListener("click", () => this.connection.retryNow());
    this.node.replaceChildren(h("span", { className: "status-text" }, "Reconnecting…"), " ", retry);
  }
}

// --- unread badges: the conversation list and the chat page's sidebar -----------------------

/**
 * unread = last_seq − the user's read seq (sending advances one's own read seq). Both only
 * move forward, so counts from the page, `hello`, live frames and the API combine by max
 * and never count a message twice.
 */
class UnreadBadges {
  constructor({ entries, currentId, summary, list, urlTemplate }) {
    this.items = new Map();
    this.currentId = currentId;
    this.summary = summary;
    this.list = list;
    this.urlTemplate = urlTemplate;
    this.me = null;
    this.helloes = 0;
    for (const node of entries) this.adopt(node);
  }

  adopt(node) {
    const id = Number(node.dataset.conversationId);
    const lastSeq = Number(node.dataset.lastSeq || 0);
    const unread = Number(node.dataset.unread || 0);
    const item = { id, node, lastSeq, readSeq: lastSeq - unread };
    this.items.set(id, item);
    return item;
  }

  async onHello(hello) {
    this.me = hello.user.id;
    let unknown = false;
    for (const { id, last_seq: lastSeq } of hello.conversations) {
      const item = this.items.get(id);
      if (item) item.lastSeq = Math.max(item.lastSeq, lastSeq);
      else unknown = true;
    }
    this.renderAll();
    // While the socket was away, reads in other tabs and joins may have happened.
    if (unknown || this.helloes++ > 0 || this.list) await this.refresh();
  }

  async refresh() {
    let conversations;
    try {
      conversations = await getJSON(`${API}/conversations`);
    } catch (error) {
      console.warn("parley: conversations not refreshed", error);
      return;
    }
    const seen = new Set();
    for (const c of conversations) {
      seen.add(c.id);
      let item = this.items.get(c.id);
      if (!item) item = this.add(c);
      if (!item) continue;
      item.lastSeq = Math.max(item.lastSeq, c.last_seq);
      item.readSeq = Math.max(item.readSeq, c.last_seq - c.unread);
    }
    if (this.list) {
      for (const [id, item] of this.items) {
        if (!seen.has(id)) this.remove(item);
      }
    }
    this.renderAll();
  }

  /** A conversation joined since the page was rendered (the list page shows it). */
  add(c) {
    if (!this.ensureList()) return null;
    const href = this.urlTemplate.replace("999999999", String(c.id));
    const title = h("a", { className: "item-title", href });
    if (c.kind === "room") title.append(h("span", { className: "room-mark", "aria-hidden": "true" }, "#"));
    title.append(c.title);
    const detail =
      c.kind === "room"
        ? `${c.topic ? `${c.topic} · ` : ""}${c.member_count} member${c.member_count === 1 ? "" : "s"}`
        : "Direct conversation";
    const li = h(
      "li",
      { "data-conversation-id": c.id, "data-last-seq": c.last_seq, "data-unread": c.unread },
      h("div", { className: "item-main" }, title, h("p", { className: "item-detail" }, detail)),
    );
    this.list.prepend(li);
    return this.adopt(li);
  }

  /** The list page without conversations shows an empty state instead of a list. */
  ensureList() {
    if (this.list) return this.list;
    const empty = document.querySelector("#conversations-empty");
    if (!empty) return null;
    this.list = h("ul", { className: "item-list conversation-list", id: "conversation-list" });
    empty.replaceWith(this.list);
    return this.list;
  }

  remove(item) {
    item.node.remove();
    this.items.delete(item.id);
  }

  onMessage(message) {
    const item = this.items.get(message.conversation);
    if (!item) {
      this.refresh();
      return;
    }
    item.lastSeq = Math.max(item.lastSeq, message.seq);
    if (message.sender?.id === this.me) item.readSeq = Math.max(item.readSeq, message.seq);
    this.render(item);
    // Most recently active first, as the server orders them.
    if (this.list && this.list.firstElementChild !== item.node) this.list.prepend(item.node);
  }

  onReceipt(receipt) {
    if (receipt.user !== this.me) return;
    const item = this.items.get(receipt.conversation);
    if (!item) return;
    item.readSeq = Math.max(item.readSeq, receipt.read_seq);
    this.render(item);
  }

  onMembership(change) {
    const item = this.items.get(change.conversation);
    if (change.event === "left" && item && this.list) {
      this.remove(item);
      this.renderSummary();
    } else if (change.event === "joined" && !item) {
      this.refresh();
    }
  }

  unread(item) {
    return item.id === this.currentId ? 0 : Math.max(0, item.lastSeq - item.readSeq);
  }

  render(item) {
    const count = this.unread(item);
    item.node.dataset.unread = String(count);
    item.node.dataset.lastSeq = String(item.lastSeq);
    item.node.classList.toggle("has-unread", count > 0);
    // The list page's badge sits in the <li>, the sidebar's inside its link.
    const holder = item.node;
    let badge = holder.querySelector(":scope > .badge");
    if (count === 0) {
      badge?.remove();
    } else {
      if (!badge) {
        badge = h("span", { className: "badge" });
        holder.append(badge);
      }
      badge.replaceChildren(
        h("span", { className: "visually-hidden" }, "("),
        String(count),
        h("span", { className: "visually-hidden" }, " unread)"),
      );
    }
    this.renderSummary();
  }

  renderAll() {
    for (const item of this.items.values()) this.render(item);
    this.renderSummary();
  }

  renderSummary() {
    if (!this.summary) return;
    const n = [...this.items.values()].filter((item) => this.unread(item) > 0).length;
    this.summary.textContent = n ? `${n} with unread messages` : this.items.size ? "All caught up" : "";
  }
}

// --- the conversation page ------------------------------------------------------------------

const PENDING_KEY = (id) => `parley:unacked:${id}`;

class ConversationView {
  constructor(root, connection) {
    this.root = root;
    this.connection = connection;
    this.id = Number(root.dataset.conversationId);
    this.me = Number(root.dataset.userId);
    this.kind = root.dataset.conversationKind;
    // A page of older history (?before=) is not the live end of the conversation: it
    // does not show live messages, and its form posts as without JavaScript.
    this.live = root.dataset.hasNewer !== "true";
    this.myName = null;
    this.list = root.querySelector("#message-list");
    this.history = root.querySelector(".history");
    this.form = root.querySelector("#composer");
    this.textarea = this.form?.querySelector("textarea");
    this.alert = root.querySelector("#composer-alert");
    this.typingLine = root.querySelector("#typing-indicator");

    this.held = new Map(); // seq -> <li>
    this.last = Number(root.dataset.lastSeq || 0); // every seq up to here is held
    this.top = this.last; // the highest seq held
    this.pending = new Map(); // client_id -> {frame, li, tries} (unacked sends, in order)
    this.members = new Map(); // user id -> {name, delivered, read, online}
    this.typers = new Map(); // user id -> {name, until}
    this.readSent = this.last; // opening the page marked it read up to here
    this.readConfirmed = this.last;
    this.resuming = false;
    this.resumedFrom = -1;
    this.lastTypingAt = -Infinity;

    for (const li of this.list.querySelectorAll("li.message[data-seq]")) {
      const seq = Number(li.dataset.seq);
      this.held.set(seq, li);
      this.top = Math.max(this.top, seq);
      const body = li.querySelector(".message-body:not(.message-deleted)");
      if (body) renderText(body, body.textContent);
      if (Number(li.dataset.senderId) === this.me) this.addTick(li, "sent");
      refreshTime(li);
    }
    this.restorePending();
    this.bindComposer();
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.scheduleRead();
      else this.savePending();
    });
    addEventListener("pagehide", () => this.savePending());
  }

  // --- frames ---

  onHello(hello) {
    this.myName = hello.user.display_name || hello.user.username;
    const entry = hello.conversations.find((c) => c.id === this.id);
    if (!entry) return; // no longer a member
    this.resuming = false;
    this.resumedFrom = -1;
    if (this.live && entry.last_seq > this.last) this.resume();
    for (const p of this.pending.values()) this.connection.send(p.frame);
    this.typers.clear();
    this.renderTyping();
    this.loadMembers();
    this.scheduleRead();
  }

  onFrame(frame) {
    switch (frame.type) {
      case "message":
        if (frame.conversation === this.id) this.onMessage(frame);
        break;
      case "ack":
        if (frame.conversation === this.id) this.onAck(frame);
        break;
      case "resumed":
        if (frame.conversation === this.id) this.onResumed(frame);
        break;
      case "receipt":
        if (frame.conversation === this.id) this.onReceipt(frame);
        break;
      case "typing":
        if (frame.conversation === this.id) this.onTyping(frame);
        break;
      case "presence":
        this.onPresence(frame);
        break;
      case "membership":
        if (frame.conversation === this.id && frame.event === "left") this.onLeft();
        break;
      case "error":
        this.onError(frame);
        break;
      default:
        break;
    }
  }

  onMessage(m) {
    if (!this.live) {
      if (m.sender?.id !== this.me) this.showNewerNotice();
      return;
    }
    this.typers.delete(m.sender?.id);
    this.renderTyping();
    if (this.held.has(m.seq)) return; // a replayed or repeated frame: shown already
    const mine = m.sender?.id === this.me;
    const pending = mine && m.client_id ? this.pending.get(m.client_id) : null;
    const stick = mine || this.nearBottom();
    let li;
    if (pending) {
      this.pending.delete(m.client_id);
      li = pending.li;
      this.setSeq(li, m.seq);
      li.classList.remove("message-pending");
    } else {
      li = this.buildMessage(m);
    }
    this.place(li, m.seq);
    if (mine) {
      this.setTick(li, "sent");
      this.readSent = Math.max(this.readSent, m.seq); // sending reads up to it
    } else if (m.sender?.id) {
      // Sending moves the sender's receipts to the message's seq; no receipt frame
      // says so (docs/protocol.md, "receipt").
      const member = this.member(m.sender.id, m.sender);
      member.delivered = Math.max(member.delivered, m.seq);
      member.read = Math.max(member.read, m.seq);
    }
    this.updateTicks();
    if (stick) this.scrollToBottom();
    if (!mine) this.scheduleRead();
  }

  onAck(ack) {
    const pending = this.pending.get(ack.client_id);
    if (!pending) return;
    this.pending.delete(ack.client_id);
    this.savePending();
    if (this.held.has(ack.seq)) {
      pending.li.remove(); // its message frame came first, under another element
      return;
    }
    this.setSeq(pending.li, ack.seq);
    pending.li.classList.remove("message-pending");
    this.setTick(pending.li, "sent");
    this.readSent = Math.max(this.readSent, ack.seq);
    this.place(pending.li, ack.seq);
    this.updateTicks();
  }

  /** Put a message with `seq` in its place: after the last held seq below it, before
   * the messages still waiting for their ack. Then check for a gap. */
  place(li, seq) {
    let node = this.list.lastElementChild;
    while (node && (node === li || !node.dataset.seq || Number(node.dataset.seq) > seq)) {
      node = node.previousElementSibling;
    }
    if (node) node.after(li);
    else this.list.prepend(li);
    this.held.set(seq, li);
    this.top = Math.max(this.top, seq);
    while (this.held.has(this.last + 1)) this.last += 1;
    refreshTime(li);
    refreshTime(li.nextElementSibling);
    this.root.querySelector("#history-empty")?.remove();
    if (this.top > this.last) this.resume(); // a gap: something was lost on the way
  }

  resume() {
    if (!this.live || this.resuming || this.paging) return;
    if (this.resumedFrom === this.last) return; // asked already and nothing came: wait
    if (this.connection.send({ type: "resume", conversation: this.id, after: this.last })) {
      this.resuming = true;
      this.resumedFrom = this.last;
    }
  }

  async onResumed(resumed) {
    this.resuming = false;
    if (resumed.more) await this.pageHistory(resumed.last_seq);
    if (this.top > this.last) this.resume();
    this.scheduleRead();
  }

  /** More than a resume replays: the rest over HTTP, a page at a time. */
  async pageHistory(until) {
    this.paging = true;
    try {
      await this.pageUntil(until);
    } finally {
      this.paging = false;
    }
  }

  async pageUntil(until) {
    while (this.last < until) {
      let page;
      try {
        page = await getJSON(
          `${API}/conversations/${this.id}/messages?after=${this.last}&limit=${HISTORY_PAGE}`,
        );
      } catch (error) {
        console.warn("parley: history not loaded", error);
        return;
      }
      const before = this.last;
      for (const m of page.messages) this.onMessage(m);
      if (this.last === before || !page.messages.length) return;
    }
  }

  onReceipt(r) {
    if (r.user === this.me) {
      this.readConfirmed = Math.max(this.readConfirmed, r.read_seq);
      this.readSent = Math.max(this.readSent, r.read_seq);
      return;
    }
    const member = this.members.get(r.user) || this.member(r.user, null);
    member.delivered = Math.max(member.delivered, r.delivered_seq, r.read_seq);
    member.read = Math.max(member.read, r.read_seq);
    this.updateTicks();
  }

  onTyping(t) {
    if (!t.user || t.user.id === this.me) return;
    this.typers.set(t.user.id, {
      name: t.user.display_name || t.user.username,
      until: performance.now() + TYPING_SHOW_MS,
    });
    this.renderTyping();
  }

  onPresence(p) {
    const member = this.members.get(p.user);
    if (!member) return;
    member.online = p.status === "online";
    this.renderPresence();
  }

  onLeft() {
    this.live = false;
    this.showAlert("You left this conversation in another window.");
  }

  onError(e) {
    const pending = e.client_id ? this.pending.get(e.client_id) : null;
    if (pending) {
      if (e.code === "unavailable" && pending.tries < UNAVAILABLE_MAX_TRIES) {
        pending.tries += 1;
        setTimeout(() => this.connection.send(pending.frame), UNAVAILABLE_RETRY_MS * pending.tries);
        return;
      }
      this.failSend(e.client_id, pending, e.detail);
      return;
    }
    if (e.client_id) return; // an error for a send this page no longer tracks
    if (e.code === "unavailable") {
      // A `read` that was not recorded: send it again in a moment.
      this.readSent = this.readConfirmed;
      setTimeout(() => this.scheduleRead(), UNAVAILABLE_RETRY_MS);
    } else {
      console.warn("parley:", e.code, e.detail);
    }
  }

  /** The send was refused (too long, rate limited…): say why and give the text back. */
  failSend(clientId, pending, detail) {
    this.pending.delete(clientId);
    this.savePending();
    pending.li.remove();
    if (this.textarea) {
      const typed = this.textarea.value;
      this.textarea.value = typed ? `${pending.frame.body}\n${typed}` : pending.frame.body;
      this.textarea.focus();
    }
    this.showAlert(detail || "The message was not sent.");
  }

  // --- sending ---

  bindComposer() {
    if (!this.form || !this.textarea) return;
    this.textarea.setAttribute("aria-keyshortcuts", "Enter");
    this.textarea.setAttribute("aria-describedby", "composer-hint");
    this.form.addEventListener("submit", (event) => {
      // Without a live socket (or on a page of old history) the form posts, as without
      // JavaScript: the page comes back with the message.
      if (!this.live || !this.connection.live) return;
      event.preventDefault();
      const body = this.textarea.value;
      if (!body.trim()) return;
      this.send(body);
      this.textarea.value = "";
      this.textarea.focus();
    });
    this.textarea.addEventListener("keydown", (event) => {
      if (event.key !== "Enter" || event.shiftKey || event.altKey) return;
      if (event.isComposing || event.keyCode === 229) return; // an IME is composing
      event.preventDefault();
      this.form.requestSubmit();
    });
    this.textarea.addEventListener("input", () => {
      this.hideAlert();
      const now = performance.now();
      if (!this.textarea.value.trim() || now - this.lastTypingAt < TYPING_SEND_MS) return;
      if (this.connection.send({ type: "typing", conversation: this.id })) this.lastTypingAt = now;
    });
  }

  send(body) {
    const frame = { type: "send", conversation: this.id, client_id: newClientId(), body };
    const li = this.buildPending(frame);
    this.list.append(li);
    refreshTime(li);
    this.root.querySelector("#history-empty")?.remove();
    this.pending.set(frame.client_id, { frame, li, tries: 0 });
    this.hideAlert();
    this.lastTypingAt = -Infinity;
    this.connection.send(frame); // if the socket drops now, it is sent again on hello
    this.scrollToBottom();
  }

  /** Unacknowledged sends outlive the page (a reload, a fallback POST): the next page
   * of this tab sends them again with the same client_id, which never duplicates. */
  savePending() {
    try {
      const frames = [...this.pending.values()].map((p) => p.frame);
      if (frames.length) sessionStorage.setItem(PENDING_KEY(this.id), JSON.stringify(frames));
      else sessionStorage.removeItem(PENDING_KEY(this.id));
    } catch {
      /* storage unavailable: the sends live as long as the page */
    }
  }

  restorePending() {
    let frames = [];
    try {
      frames = JSON.parse(sessionStorage.getItem(PENDING_KEY(this.id)) || "[]");
    } catch {
      return;
    }
    if (!this.live) return;
    for (const frame of frames) {
      if (frame?.type !== "send" || typeof frame.client_id !== "string") continue;
      if (typeof frame.body !== "string" || frame.conversation !== this.id) continue;
      const li = this.buildPending(frame);
      this.list.append(li);
      refreshTime(li);
      this.pending.set(frame.client_id, { frame, li, tries: 0 });
    }
  }

  // --- reading ---

  scheduleRead() {
    if (!this.live || document.visibilityState !== "visible") return;
    if (this.last <= this.readSent || this.readTimer) return;
    this.readTimer = setTimeout(() => {
      this.readTimer = null;
      const seq = this.last;
      if (seq > this.readSent && this.connection.send({ type: "read", conversation: this.id, seq })) {
        this.readSent = seq;
      }
    }, READ_DELAY_MS);
  }

  // --- members: receipts and presence ---

  member(id, user) {
    let member = this.members.get(id);
    if (!member) {
      member = { name: null, delivered: 0, read: 0, online: false };
      this.members.set(id, member);
    }
    if (user) member.name = user.display_name || user.username;
    return member;
  }

  async loadMembers() {
    let rows;
    try {
      rows = await getJSON(`${API}/conversations/${this.id}/members`);
    } catch (error) {
      console.warn("parley: members not loaded", error);
      return;
    }
    for (const row of rows) {
      const member = this.member(row.user.id, row.user);
      member.delivered = Math.max(member.delivered, row.last_delivered_seq, row.last_read_seq);
      member.read = Math.max(member.read, row.last_read_seq);
      member.online = row.online;
    }
    this.renderPresence();
    this.updateTicks();
  }

  renderPresence() {
    let online = 0;
    for (const [id, member] of this.members) if (id !== this.me && member.online) online += 1;
    for (const node of this.root.querySelectorAll("[data-presence-user]")) {
      const member = this.members.get(Number(node.dataset.presenceUser));
      if (!member) continue;
      const status = member.online ? "online" : "offline";
      node.dataset.presence = status;
      node.hidden = false;
      if (node.classList.contains("presence-dot")) {
        node.setAttribute("aria-label", status);
        node.title = status;
      } else {
        node.textContent = member.online ? "Online" : "Offline";
      }
    }
    const count = this.root.querySelector("[data-online-count]");
    if (count) {
      count.hidden = false;
      count.textContent = ` · ${online} online`;
    }
  }

  // --- ticks: pending → sent → delivered → read ---

  addTick(li, state) {
    const meta = li.querySelector(".message-meta");
    if (!meta || meta.querySelector(".tick")) return;
    meta.append(h("span", { className: "tick", role: "img" }));
    this.setTick(li, state);
  }

  setTick(li, state, label) {
    const tick = li.querySelector(".tick");
    if (!tick) return;
    const text =
      label || { pending: "Sending…", sent: "Sent", delivered: "Delivered", read: "Read" }[state];
    if (tick.dataset.state === state && tick.getAttribute("aria-label") === text) return;
    tick.dataset.state = state;
    tick.setAttribute("aria-label", text);
    tick.title = text;
  }

  updateTicks() {
    const others = [...this.members].filter(([id]) => id !== this.me).map(([, m]) => m);
    if (!others.length) return;
    for (const [seq, li] of this.held) {
      if (Number(li.dataset.senderId) !== this.me) continue;
      const readBy = others.filter((m) => m.read >= seq).length;
      const deliveredTo = others.filter((m) => m.delivered >= seq).length;
      const room = this.kind === "room";
      if (readBy) this.setTick(li, "read", room ? `Read by ${readBy} of ${others.length}` : "Read");
      else if (deliveredTo) {
        this.setTick(li, "delivered", room ? `Delivered to ${deliveredTo} of ${others.length}` : "Delivered");
      } else this.setTick(li, "sent");
    }
  }

  // --- typing ---

  renderTyping() {
    if (!this.typingLine) return;
    const now = performance.now();
    for (const [id, t] of this.typers) if (t.until <= now) this.typers.delete(id);
    const names = [...this.typers.values()].map((t) => t.name);
    let text = "";
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = "Several people are typing…";
    if (this.typingLine.textContent !== text) this.typingLine.textContent = text;
    clearTimeout(this.typingTimer);
    if (names.length) {
      const next = Math.min(...[...this.typers.values()].map((t) => t.until)) - now;
      this.typingTimer = setTimeout(() => this.renderTyping(), Math.max(50, next));
    }
  }

  // --- building messages ---

  buildMessage(m) {
    const mine = m.sender?.id === this.me;
    const name = m.sender?.display_name || m.sender?.username || "";
    const li = h("li", {
      className: mine ? "message message-mine" : "message",
      "data-sender-id": m.sender?.id ?? "",
    });
    const created = new Date(m.created_at);
    li.append(
      h(
        "p",
        { className: "message-meta" },
        h("span", { className: "message-sender", title: `@${m.sender?.username ?? ""}` }, name),
        " ",
        h(
          "a",
          { className: "message-time" },
          h("time", { datetime: Number.isNaN(created.getTime()) ? "" : created.toISOString() }),
        ),
      ),
    );
    const body = h("p", { className: "message-body" });
    renderText(body, m.body ?? "");
    li.append(body);
    this.setSeq(li, m.seq);
    if (mine) this.addTick(li, "sent");
    return li;
  }

  buildPending(frame) {
    const li = this.buildMessage({
      seq: null,
      sender: {
        id: this.me,
        display_name: this.myName || this.root.dataset.userName || "You",
        username: this.root.dataset.username || "",
      },
      body: frame.body,
      created_at: new Date().toISOString(),
    });
    li.classList.add("message-pending");
    li.dataset.clientId = frame.client_id;
    this.setTick(li, "pending");
    return li;
  }

  setSeq(li, seq) {
    if (seq === null || seq === undefined) {
      li.removeAttribute("id");
      delete li.dataset.seq;
      li.querySelector(".message-time")?.removeAttribute("href");
      return;
    }
    li.id = `m-${seq}`;
    li.dataset.seq = String(seq);
    li.querySelector(".message-time")?.setAttribute("href", `#m-${seq}`);
  }

  // --- scrolling and notices ---

  /** The history scrolls in column-reverse: scrollTop is 0 at the bottom, negative above. */
  nearBottom() {
    return !this.history || Math.abs(this.history.scrollTop) < NEAR_BOTTOM_PX;
  }

  scrollToBottom() {
    if (this.history) this.history.scrollTop = 0;
  }

  showNewerNotice() {
    if (this.root.querySelector("#newer-notice")) return;
    const href = this.root.dataset.conversationUrl || location.pathname;
    const notice = h(
      "p",
      { className: "page-link newer-notice", id: "newer-notice", role: "status" },
      "New messages have arrived. ",
      h("a", { href }, "Go to the newest"),
    );
    this.list.after(notice);
  }

  showAlert(text) {
    if (!this.alert) return;
    this.alert.textContent = text;
    this.alert.hidden = false;
  }

  hideAlert() {
    if (this.alert && !this.alert.hidden) {
      this.alert.hidden = true;
      this.alert.textContent = "";
    }
  }
}

// --- start -------------------------------------------------------------------------------

function root() {
  return document.documentElement;
}

function loginUrl(base) {
  const next = encodeURIComponent(location.pathname + location.search);
  return `${base || "/login/"}?next=${next}`;
}

function main() {
  const config = document.querySelector("[data-realtime-url]");
  if (!config || !("WebSocket" in window)) return;
  root().classList.add("js-live");

  const conversationRoot = document.querySelector("#conversation[data-conversation-id]");
  const currentId = conversationRoot ? Number(conversationRoot.dataset.conversationId) : null;
  const entries = document.querySelectorAll(
    ".conversation-list > li[data-conversation-id], .conversation-nav a[data-conversation-id]",
  );
  const list = document.querySelector("#conversation-list");
  const badges = new UnreadBadges({
    entries,
    currentId,
    summary: document.querySelector("#unread-summary"),
    list,
    urlTemplate: config.dataset.conversationUrlTemplate || "/c/999999999/",
  });
  let view = null;
  let status = null;

  const connection = new Connection({
    urls: realtimeUrls(config.dataset.realtimeUrl),
    onFrame(frame) {
      if (!frame || typeof frame.type !== "string") return;
      if (frame.type === "hello") {
        root().dataset.realtimeNode = String(frame.node);
        view?.onHello(frame);
        badges.onHello(frame);
        return;
      }
      if (frame.type === "message") badges.onMessage(frame);
      else if (frame.type === "receipt") badges.onReceipt(frame);
      else if (frame.type === "membership") badges.onMembership(frame);
      view?.onFrame(frame);
    },
    onState(state) {
      status.render(state);
    },
    onStop(code) {
      if (code === 4401) {
        location.assign(loginUrl(config.dataset.loginUrl));
        return;
      }
      status.render(
        "stopped",
        "Live updates are off: the chat server does not accept this page's address. Sending still works.",
      );
    },
  });
  status = new StatusLine(document.querySelector("#connection-status"), connection);
  if (conversationRoot) view = new ConversationView(conversationRoot, connection);
  status.render("connecting");
  connection.start();
}

main();
