// securechat's browser client: the JSON envelopes of docs/protocol.md over wss://HOST:PORT/ws.
//
// It follows the terminal client's rules (securechat/client.py):
// - every say/dm gets a client id that is unique for the user (a random prefix per page load and a
//   counter) and keeps it: messages go out one at a time, in order, each once the one before was
//   acknowledged or refused; one refused as rate_limited goes again after retry_after; one not
//   acknowledged when the connection dropped is sent again with the same id after the reconnect
//   (the server answers a re-send with the original ack and delivers nothing twice);
// - after a reconnect it catches up with `history after=HIGHEST` (no scope, paged while `more`),
//   HIGHEST being the highest message id seen; every message is kept by id, so a replay, a stored
//   DM handed over twice or a live message that also comes in a replay is shown once;
// - the server's pings are answered; after 30 s without a frame the page pings, and a connection
//   silent for 15 s more is taken for dead and replaced.
//
// Wire strings (names, texts, topics, error messages) only ever reach the page through
// textContent / createTextNode / setAttribute of plain attributes: never innerHTML.
"use strict";

(() => {
  const LOBBY = "lobby";
  const SERVER_USER = "server";
  const NAME_RE = /^[a-z0-9_][a-z0-9_.-]{0,31}$/;
  const MAX_TEXT_CHARS = 4000;
  const HISTORY_PAGE = 50; // messages shown when a conversation opens
  const OLDER_PAGE = 50; // at least this many more on a scroll up, when there are
  const MAX_HISTORY_LIMIT = 500;
  const KEEPALIVE_INTERVAL = 30000;
  const KEEPALIVE_TIMEOUT = 15000;
  const CONNECT_TIMEOUT = 10000;
  const LOGIN_TIMEOUT = 15000;
  const BACKOFF_FIRST = 500;
  const BACKOFF_CAP = 30000;

  const $ = (id) => document.getElementById(id);
  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  // ---- state -------------------------------------------------------------------------------

  const randomHex = (bytes) =>
    Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) =>
      b.toString(16).padStart(2, "0"),
    ).join("");

  const state = {
    ws: null,
    credentials: null, // {username, password|null}: kept in memory only, for reconnects
    me: null,
    loggedIn: false, // a welcome arrived on the current socket
    everLoggedIn: false, // this session got in once: a drop means reconnect, not a failed login
    stopping: false, // logging out, kicked or refused: no reconnect
    attempt: 0,
    reconnectTimer: null,
    reconnectAt: 0,
    lastHeard: 0,
    keepaliveTimer: null,
    loginTimer: null,
    idPrefix: randomHex(6),
    nextId: 1,
    rooms: [], // names of the rooms the user is a member of, sorted
    conversations: new Map(), // key ("room:NAME" / "dm:NAME") -> Conversation
    current: null, // key of the conversation on screen
    highest: 0, // highest message id seen
    seen: new Set(), // message ids seen (dedupe across conversations)
    online: new Set(), // users known to be online (from presence and who)
    outbox: [], // {envelope, key, node, inFlight, retryTimer}
    waiters: new Map(), // request id -> function(reply) (null: the connection dropped)
  };

  const newId = (kind) => `${kind}${state.idPrefix}-${state.nextId++}`;

  class Conversation {
    constructor(kind, name) {
      this.kind = kind; // "room" | "dm"
      this.name = name;
      this.items = []; // sorted by sortKey: messages and notices
      this.byId = new Map(); // message id -> item
      this.noticeSeq = 0;
      this.loaded = false; // the opening page of history arrived
      this.loading = false;
      this.complete = false; // nothing older exists
      this.coveredFrom = null; // every message with an id above this is here
      this.topic = "";
      this.members = null; // {members: [...], online: [...]} from joined / who
      this.unread = 0;
      this.listNode = null;
    }
    get key() {
      return `${this.kind}:${this.name}`;
    }
    lowestId() {
      for (const item of this.items) if (item.id !== undefined) return item.id;
      return null;
    }
    highestId() {
      for (let i = this.items.length - 1; i >= 0; i--) {
        if (this.items[i].id !== undefined) return this.items[i].id;
      }
      return 0;
    }
  }

  const conversation = (kind, name) => {
    const key = `${kind}:${name}`;
    let conv = state.conversations.get(key);
    if (!conv) {
      conv = new Conversation(kind, name);
      state.conversations.set(key, conv);
    }
    return conv;
  };

  // Items sort by [message id, 0] or, for a notice, [id of the newest message before it, 1, seq].
  const compareKeys = (a, b) => {
    for (let i = 0; i < Math.max(a.length, b.length); i++) {
      const x = a[i] ?? -1;
      const y = b[i] ?? -1;
      if (x !== y) return x < y ? -1 : 1;
    }
    return 0;
  };

  const insertItem = (conv, item) => {
    let lo = 0;
    let hi = conv.items.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (compareKeys(conv.items[mid].sortKey, item.sortKey) < 0) lo = mid + 1;
      else hi = mid;
    }
    conv.items.splice(lo, 0, item);
    if (state.current === conv.key) {
      const timeline = $("timeline");
      const next = conv.items[lo + 1];
      const scroller = $("timeline-scroll");
      const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
      const before = scroller.scrollHeight;
      timeline.insertBefore(renderItem(item), next ? renderItem(next) : null);
      if (next && item.id !== undefined) {
        // An older message came in above: keep what the reader looks at in place.
        scroller.scrollTop += scroller.scrollHeight - before;
      } else if (atBottom) {
        scroller.scrollTop = scroller.scrollHeight;
      }
    } else if (item.id !== undefined && item.unread) {
      conv.unread += 1;
      renderConversationList();
    }
  };

  // ---- rendering ---------------------------------------------------------------------------

  const clock = (ts) => {
    const date = new Date(ts);
    if (Number.isNaN(date.getTime())) return "--:--:--";
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  };

  const bdi = (text, className) => {
    const node = el("bdi", className, text);
    return node;
  };

  const renderItem = (item) => {
    if (item.node) return item.node;
    const li = el("li");
    if (item.id !== undefined) {
      const m = item.message;
      li.className = "msg";
      li.dataset.id = String(m.id);
      if (m.from === SERVER_USER) li.classList.add("announcement");
      if (m.from === state.me) li.classList.add("mine");
      if (m.action) li.classList.add("action");
      const time = el("time", "ts", clock(m.ts));
      time.setAttribute("datetime", m.ts);
      time.title = m.ts;
      li.append(time, " ");
      if (m.from === SERVER_USER) {
        li.append(el("span", "label", "Announcement"), " ");
        li.append(bdi(m.text, "text"));
      } else if (m.action) {
        li.append("* ", bdi(m.from, "from"), " ", bdi(m.text, "text"));
      } else {
        li.append(bdi(m.from, "from"), el("span", "sep", ": "), bdi(m.text, "text"));
      }
      const text = li.querySelector(".text");
      text.setAttribute("dir", "auto");
    } else {
      li.className = `notice ${item.kind || ""}`.trim();
      li.append(...item.parts.map((part) => (typeof part === "string" ? part : bdi(part.name))));
    }
    item.node = li;
    return li;
  };

  const renderPending = (entry) => {
    const li = el("li", "msg mine pending");
    li.append(
      el("span", "ts", "sending…"),
      " ",
      bdi(state.me, "from"),
      el("span", "sep", ": "),
      bdi(entry.envelope.text, "text"),
    );
    li.querySelector(".text").setAttribute("dir", "auto");
    return li;
  };

  const renderTimeline = () => {
    const timeline = $("timeline");
    timeline.replaceChildren();
    const conv = state.conversations.get(state.current);
    if (!conv) return;
    for (const item of conv.items) timeline.append(renderItem(item));
    for (const entry of state.outbox) {
      if (entry.key === conv.key && entry.node) timeline.append(entry.node);
    }
    $("history-start").hidden = !conv.complete;
    $("load-older").hidden = conv.complete;
    $("load-older").disabled = conv.loading;
    const scroller = $("timeline-scroll");
    scroller.scrollTop = scroller.scrollHeight;
  };

  const appendPendingNode = (entry) => {
    if (state.current === entry.key) {
      $("timeline").append(entry.node);
      const scroller = $("timeline-scroll");
      scroller.scrollTop = scroller.scrollHeight;
    }
  };

  // The lists keep one node per conversation and update it in place, so a keyboard user's focus
  // on a button stays put when a message arrives elsewhere.
  const renderConversationList = () => {
    const node = (conv, label) => {
      if (!conv.listNode) {
        const li = el("li");
        const button = el("button", "conv-button");
        button.type = "button";
        button.append(bdi(label), el("span", "badge-slot"));
        button.addEventListener("click", () => openConversation(conv.key));
        li.append(button);
        conv.listNode = li;
      }
      const button = conv.listNode.firstChild;
      const slot = button.lastChild;
      if (conv.unread) {
        const badge = el("span", "badge", String(conv.unread));
        badge.setAttribute("aria-label", `${conv.unread} unread`);
        slot.replaceChildren(" ", badge);
      } else {
        slot.replaceChildren();
      }
      if (conv.key === state.current) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
      button.classList.toggle("online", conv.kind === "dm" && state.online.has(conv.name));
      return conv.listNode;
    };
    const place = (list, nodes) => {
      const same =
        list.children.length === nodes.length && nodes.every((n, i) => list.children[i] === n);
      if (!same) list.replaceChildren(...nodes);
    };
    place(
      $("room-list"),
      state.rooms.map((name) => node(conversation("room", name), `#${name}`)),
    );
    const dms = [...state.conversations.values()]
      .filter((conv) => conv.kind === "dm")
      .sort((a, b) => a.name.localeCompare(b.name));
    place(
      $("dm-list"),
      dms.map((conv) => node(conv, conv.name)),
    );
  };

  const renderHeader = () => {
    const conv = state.conversations.get(state.current);
    if (!conv) return;
    $("conv-title").textContent = conv.kind === "room" ? `#${conv.name}` : `@${conv.name}`;
    $("conv-topic").textContent = conv.kind === "room" ? conv.topic : "direct messages";
    $("who-button").hidden = conv.kind !== "room";
    $("leave-button").hidden = conv.kind !== "room";
    renderMembers();
  };

  const renderMembers = () => {
    const conv = state.conversations.get(state.current);
    const panel = $("members");
    if (!conv || conv.kind !== "room" || !conv.members) {
      panel.hidden = true;
      return;
    }
    panel.hidden = false;
    $("member-list").replaceChildren(
      ...conv.members.members.map((name) => {
        const isOnline = state.online.has(name) || name === state.me;
        const li = el("li", isOnline ? "member online" : "member");
        li.append(bdi(name), el("span", "visually-hidden", isOnline ? " (online)" : " (offline)"));
        return li;
      }),
    );
  };

  const setStatus = (text) => {
    $("status").textContent = text;
  };

  const showAlert = (text) => {
    $("alert-text").textContent = text;
    $("alert").hidden = false;
  };

  const notice = (conv, parts, kind) => {
    // After every message seen so far; history replayed later goes above it.
    const after = Math.max(conv.highestId(), state.highest);
    const item = { parts, kind, sortKey: [after, 1, conv.noticeSeq++] };
    insertItem(conv, item);
  };

  // ---- the connection ----------------------------------------------------------------------

  const wsUrl = () => `${location.protocol === "http:" ? "ws" : "wss"}://${location.host}/ws`;

  const send = (envelope) => {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      state.ws.send(JSON.stringify(envelope));
      return true;
    }
    return false;
  };

  const connect = () => {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    $("reconnect-now").hidden = true;
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (error) {
      connectionLost(null, `cannot open the connection: ${error.message}`);
      return;
    }
    state.ws = ws;
    state.loggedIn = false;
    setStatus(state.everLoggedIn ? "reconnecting…" : "connecting…");
    // A connection attempt that neither opens nor fails (a network coming back, a server
    // that accepted and hangs) is given up, like a silent connection.
    clearTimeout(state.loginTimer);
    state.loginTimer = setTimeout(() => {
      if (state.ws === ws && ws.readyState === WebSocket.CONNECTING) {
        state.ws = null;
        ws.close();
        connectionLost(null, "the server did not answer");
      }
    }, CONNECT_TIMEOUT);
    ws.addEventListener("open", () => {
      if (state.ws !== ws) return;
      clearTimeout(state.loginTimer);
      // presence_lists: several users' online/offline may come in one presence.
      const hello = {
        type: "hello",
        username: state.credentials.username,
        features: ["presence_lists"],
        id: "login",
      };
      if (state.credentials.password) hello.password = state.credentials.password;
      ws.send(JSON.stringify(hello));
      state.loginTimer = setTimeout(() => {
        if (state.ws === ws && !state.loggedIn) ws.close(4000, "login timed out");
      }, LOGIN_TIMEOUT);
    });
    ws.addEventListener("message", (event) => {
      if (state.ws !== ws) return;
      state.lastHeard = Date.now();
      if (typeof event.data !== "string") return; // the protocol has text frames only
      let envelope;
      try {
        envelope = JSON.parse(event.data);
      } catch {
        showAlert("ignored a frame from the server that is not JSON");
        return;
      }
      if (envelope === null || typeof envelope !== "object" || typeof envelope.type !== "string") {
        showAlert("ignored a frame from the server that is not an envelope");
        return;
      }
      handle(envelope);
    });
    ws.addEventListener("close", (event) => {
      if (state.ws !== ws) return;
      connectionLost(event, null);
    });
  };

  const connectionLost = (event, why) => {
    clearTimeout(state.loginTimer);
    clearTimeout(state.keepaliveTimer);
    const wasLoggedIn = state.loggedIn;
    state.ws = null;
    state.loggedIn = false;
    for (const entry of state.outbox) {
      entry.inFlight = false;
      clearTimeout(entry.retryTimer);
    }
    const waiters = [...state.waiters.values()];
    state.waiters.clear();
    for (const waiter of waiters) waiter(null);
    for (const conv of state.conversations.values()) conv.loading = false;
    if (state.stopping) return;
    if (!state.everLoggedIn) {
      // The first login did not get through: say why, and let the user try again.
      const reason =
        why ||
        (event && event.reason) ||
        "could not reach the server (is it running, and does it trust this page's origin?)";
      loginFailed(reason);
      return;
    }
    if (wasLoggedIn) setStatus("disconnected");
    scheduleReconnect();
  };

  const scheduleReconnect = () => {
    const delay =
      Math.min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** state.attempt) * (0.5 + Math.random() / 2);
    state.attempt += 1;
    state.reconnectAt = Date.now() + delay;
    $("reconnect-now").hidden = false;
    const tick = () => {
      const left = Math.max(0, state.reconnectAt - Date.now());
      setStatus(`disconnected; reconnecting in ${Math.ceil(left / 1000)} s`);
    };
    tick();
    const countdown = setInterval(tick, 1000);
    state.reconnectTimer = setTimeout(() => {
      clearInterval(countdown);
      connect();
    }, delay);
    state.reconnectCountdown = countdown;
  };

  const reconnectNow = () => {
    if (state.ws) return; // connecting or connected already
    clearTimeout(state.reconnectTimer);
    clearInterval(state.reconnectCountdown);
    connect();
  };

  const keepalive = () => {
    clearTimeout(state.keepaliveTimer);
    const check = () => {
      if (!state.loggedIn) return;
      const silent = Date.now() - state.lastHeard;
      if (silent < KEEPALIVE_INTERVAL) {
        state.keepaliveTimer = setTimeout(check, KEEPALIVE_INTERVAL - silent);
        return;
      }
      const since = state.lastHeard;
      send({ type: "ping", id: "keepalive" });
      state.keepaliveTimer = setTimeout(() => {
        if (state.loggedIn && state.lastHeard === since && state.ws) {
          // No answer: the connection is dead even if the socket has not noticed.
          state.ws.close(4001, "the server stopped answering");
        } else {
          check();
        }
      }, KEEPALIVE_TIMEOUT);
    };
    state.keepaliveTimer = setTimeout(check, KEEPALIVE_INTERVAL);
  };

  // Send a request that expects an answer with ref = its id.
  const request = (envelope, onReply) => {
    const id = newId("r");
    envelope.id = id;
    if (!send(envelope)) {
      showAlert("not connected right now; try again in a moment");
      return false;
    }
    state.waiters.set(id, onReply);
    return true;
  };

  // ---- what the server sends ---------------------------------------------------------------

  const handle = (envelope) => {
    const ref = typeof envelope.ref === "string" ? envelope.ref : null;
    switch (envelope.type) {
      case "welcome":
        welcomed(envelope);
        return;
      case "ping":
        send({ type: "pong", ref: envelope.id });
        return;
      case "pong":
        return;
      case "message":
        received(envelope);
        return;
      case "ack":
        acknowledged(envelope);
        return;
      case "error":
        if (!state.loggedIn) {
          loginRefused(envelope);
          return;
        }
        errored(envelope);
        return;
      case "history_end":
        break;
      case "joined":
        joined(envelope);
        break;
      case "left":
        left(envelope);
        break;
      case "presence":
        presence(envelope);
        break;
      case "topic":
        topic(envelope);
        break;
      case "members":
      case "room_list":
      case "kicked":
        break;
      default:
        return; // a kind this page does not know: ignore it, as the protocol allows growth
    }
    const waiter = ref !== null ? state.waiters.get(ref) : undefined;
    if (waiter) {
      state.waiters.delete(ref);
      waiter(envelope);
    }
  };

  const welcomed = (welcome) => {
    clearTimeout(state.loginTimer);
    const first = !state.everLoggedIn;
    state.loggedIn = true;
    state.everLoggedIn = true;
    state.attempt = 0;
    state.me = welcome.username;
    state.rooms = [...welcome.rooms].sort();
    for (const name of state.rooms) conversation("room", name);
    setStatus("connected");
    $("reconnect-now").hidden = true;
    keepalive();
    if (first) {
      showChat();
      openConversation(`room:${state.rooms.includes(LOBBY) ? LOBBY : state.rooms[0]}`);
    } else {
      if (!state.conversations.has(state.current) || !stillThere(state.current)) {
        openConversation(`room:${LOBBY}`);
      }
      renderConversationList();
      notice(state.conversations.get(state.current), ["reconnected"], "status");
      // Presence changes went by while we were away: ask again for what is on screen.
      state.online = new Set();
      for (const conv of state.conversations.values()) conv.members = null;
      refreshMembers(state.conversations.get(state.current));
      if (state.highest) sync(state.highest);
      const conv = state.conversations.get(state.current);
      if (conv && !conv.loaded) loadOpening(conv);
    }
    pump();
  };

  const stillThere = (key) => !key.startsWith("room:") || state.rooms.includes(key.slice(5));

  const loginRefused = (error) => {
    clearTimeout(state.loginTimer);
    let text;
    if (error.code === "auth_failed") {
      text = "Login refused: wrong username or password, or no matching certificate.";
    } else if (error.code === "rate_limited") {
      const wait = error.retry_after !== undefined ? ` in ${Math.ceil(error.retry_after)} s` : "";
      text = `Too many attempts: try again${wait}.`;
    } else if (error.code === "server_busy") {
      text = "The server is busy: try again later.";
    } else {
      text = `Login failed: ${error.message} (${error.code})`;
    }
    if (state.everLoggedIn && (error.code === "server_busy" || error.code === "rate_limited")) {
      // Not now rather than not you: the reconnect goes on (the socket closes next).
      setStatus(text);
      return;
    }
    state.stopping = true;
    if (state.ws) state.ws.close();
    if (state.everLoggedIn) backToLogin(text);
    else loginFailed(text);
  };

  const received = (message) => {
    if (typeof message.id !== "number") return;
    const isNew = !state.seen.has(message.id);
    if (!isNew) return;
    state.seen.add(message.id);
    if (message.id > state.highest) state.highest = message.id;
    let conv;
    if (typeof message.room === "string") {
      conv = conversation("room", message.room);
    } else if (typeof message.to === "string") {
      const peer = message.from === state.me ? message.to : message.from;
      const fresh = !state.conversations.has(`dm:${peer}`);
      conv = conversation("dm", peer);
      if (fresh) renderConversationList();
    } else {
      return;
    }
    // Our own message is here: its "sending…" line goes (the ack follows).
    const head = state.outbox[0];
    if (head && head.inFlight && head.node && message.from === state.me) {
      const target = head.envelope.type === "say" ? `room:${head.envelope.room}` : null;
      const peerKey = head.envelope.type === "dm" ? `dm:${head.envelope.to}` : null;
      if ((target || peerKey) === conv.key && head.envelope.text === message.text) {
        head.node.remove();
        head.node = null;
      }
    }
    insertItem(conv, {
      id: message.id,
      message,
      sortKey: [message.id, 0],
      // New to the reader (live or caught up), not older history coming in above.
      unread: message.id > conv.highestId() && message.from !== state.me,
    });
  };

  const acknowledged = (ack) => {
    const head = state.outbox[0];
    if (!head || ack.ref !== head.envelope.id) return;
    finishHead();
    if (ack.stored && head.envelope.type === "dm") {
      notice(
        conversation("dm", head.envelope.to),
        [{ name: head.envelope.to }, " is offline: the message is stored for their next login"],
        "status",
      );
    }
  };

  const finishHead = () => {
    const head = state.outbox.shift();
    clearTimeout(head.retryTimer);
    if (head.node) head.node.remove();
    pump();
  };

  const errored = (error) => {
    const ref = typeof error.ref === "string" ? error.ref : null;
    const head = state.outbox[0];
    if (head && ref === head.envelope.id) {
      if (error.code === "rate_limited" && error.retry_after !== undefined) {
        head.inFlight = false;
        setStatus(`rate limited: sending again in ${error.retry_after.toFixed(1)} s`);
        head.retryTimer = setTimeout(() => {
          if (state.loggedIn) setStatus("connected");
          pump();
        }, error.retry_after * 1000);
        return;
      }
      finishHead();
      notice(
        state.conversations.get(head.key),
        [`not sent: ${error.message} (${error.code}): `, { name: head.envelope.text }],
        "error",
      );
      return;
    }
    if (error.code === "kicked") {
      state.stopping = true;
      backToLogin(`You were disconnected: ${error.message}`);
      return;
    }
    if (error.code === "server_shutdown") {
      setStatus("the server is restarting");
      return; // the close follows, then the reconnect
    }
    const waiter = ref !== null ? state.waiters.get(ref) : undefined;
    if (waiter) {
      state.waiters.delete(ref);
      waiter(error);
      return;
    }
    showAlert(`${error.message} (${error.code})`);
  };

  const joined = (envelope) => {
    if (!state.rooms.includes(envelope.room)) {
      state.rooms.push(envelope.room);
      state.rooms.sort();
    }
    const conv = conversation("room", envelope.room);
    conv.topic = envelope.topic;
    conv.members = { members: [...envelope.members] };
    renderConversationList();
    if (state.current === conv.key) renderHeader();
  };

  const left = (envelope) => {
    state.rooms = state.rooms.filter((name) => name !== envelope.room);
    renderConversationList();
    if (state.current === `room:${envelope.room}`) {
      openConversation(`room:${state.rooms.includes(LOBBY) ? LOBBY : state.rooms[0] || LOBBY}`);
    }
  };

  const presence = (envelope) => {
    if (Array.isArray(envelope.users)) {
      // A list (we asked for presence_lists): online or offline of several users.
      for (const user of envelope.users) {
        if (envelope.state === "online") state.online.add(user);
        if (envelope.state === "offline") state.online.delete(user);
      }
      const conv = state.conversations.get(state.current);
      const verb = envelope.users.length === 1 ? "is" : "are";
      const names = envelope.users.flatMap((name, i) => (i ? [", ", { name }] : [{ name }]));
      if (conv) notice(conv, [...names, ` ${verb} ${envelope.state}`], "presence");
      renderMembers();
      renderConversationList();
      return;
    }
    const who = { name: envelope.username };
    if (envelope.state === "online") state.online.add(envelope.username);
    if (envelope.state === "offline") state.online.delete(envelope.username);
    if (typeof envelope.room === "string") {
      const conv = conversation("room", envelope.room);
      if (conv.members) {
        const names = new Set(conv.members.members);
        if (envelope.state === "joined") names.add(envelope.username);
        if (envelope.state === "left") names.delete(envelope.username);
        conv.members.members = [...names].sort();
      }
      notice(conv, [who, ` ${envelope.state} #${envelope.room}`], "presence");
    } else {
      // online/offline concern the user, not a room: say it where the reader is.
      const conv = state.conversations.get(state.current);
      if (conv) notice(conv, [who, ` is ${envelope.state}`], "presence");
    }
    renderMembers();
    renderConversationList();
  };

  const topic = (envelope) => {
    const conv = conversation("room", envelope.room);
    conv.topic = envelope.topic;
    if (typeof envelope.by === "string") {
      const parts =
        envelope.by === SERVER_USER
          ? [`the topic is now (from the config file): ${envelope.topic || "(none)"}`]
          : envelope.topic
            ? [{ name: envelope.by }, ` set the topic: ${envelope.topic}`]
            : [{ name: envelope.by }, " cleared the topic"];
      notice(conv, parts, "status");
    }
    if (state.current === conv.key) renderHeader();
  };

  // ---- history -----------------------------------------------------------------------------

  const scope = (conv) => (conv.kind === "room" ? { room: conv.name } : { with: conv.name });

  // The latest messages, when a conversation is first opened.
  const loadOpening = (conv) => {
    if (conv.loading || !state.loggedIn) return;
    if (conv.kind === "room" && !state.rooms.includes(conv.name)) return;
    conv.loading = true;
    const sent = request({ type: "history", ...scope(conv), limit: HISTORY_PAGE }, (reply) => {
      conv.loading = false;
      if (!reply) return;
      if (reply.type === "error" && reply.code === "rate_limited") {
        setTimeout(() => loadOpening(conv), (reply.retry_after ?? 1) * 1000);
        return;
      }
      if (reply.type !== "history_end") {
        notice(conv, [`history: ${reply.message} (${reply.code})`], "error");
        return;
      }
      conv.loaded = true;
      // The page is the latest HISTORY_PAGE messages: everything above its first is here (and
      // what came live before it came in order since the login).
      const lowest = conv.lowestId();
      conv.complete = !reply.more;
      conv.coveredFrom = conv.complete ? 0 : Math.max(0, (lowest ?? reply.last) - 1);
      if (state.current === conv.key) {
        $("history-start").hidden = !conv.complete;
        $("load-older").hidden = conv.complete;
      }
    });
    if (!sent) conv.loading = false;
  };

  // Older messages, on a scroll up. The protocol pages forward only (`after`), and ids are
  // shared by every room, so: ask for the messages after LOW, a step below the oldest shown,
  // paging forward until the oldest shown is reached; widen the step while it finds too few.
  const loadOlder = (conv) => {
    if (conv.loading || conv.complete || !state.loggedIn) return;
    if (conv.kind === "room" && !state.rooms.includes(conv.name)) return;
    const lowest = conv.lowestId();
    let top = lowest ?? (conv.coveredFrom ?? 0) + 1;
    if (top <= 1) {
      markComplete(conv);
      return;
    }
    const oldTop = top;
    let span = conv.span || 200;
    const done = () => {
      conv.loading = false;
      if (state.current === conv.key) $("load-older").disabled = false;
    };
    conv.loading = true;
    $("load-older").disabled = true;
    const step = () => {
      const low = Math.max(0, top - span);
      page(low);
      function page(after) {
        const sent = request(
          { type: "history", ...scope(conv), after, limit: MAX_HISTORY_LIMIT },
          (reply) => {
            if (!reply) {
              done();
              return;
            }
            if (reply.type !== "history_end") {
              done();
              notice(conv, [`history: ${reply.message} (${reply.code})`], "error");
              return;
            }
            // How many older messages this scroll brought so far.
            const found = conv.items.filter(
              (item) => item.id !== undefined && item.id > low && item.id < oldTop,
            ).length;
            if (reply.more && reply.last < top) {
              page(reply.last); // the range holds more than a page: go on to its end
              return;
            }
            conv.coveredFrom = low;
            if (low === 0) {
              done();
              markComplete(conv);
              return;
            }
            if (found < OLDER_PAGE / 2 && span < 1e9) {
              span *= 4; // sparse room: look further back
              conv.span = span;
              top = low + 1;
              step();
              return;
            }
            done();
          },
        );
        if (!sent) done();
      }
    };
    step();
  };

  const markComplete = (conv) => {
    conv.complete = true;
    conv.coveredFrom = 0;
    if (state.current === conv.key) {
      $("history-start").hidden = false;
      $("load-older").hidden = true;
    }
  };

  // After a reconnect: everything visible to us since the highest id seen, page by page.
  const sync = (after) => {
    const envelope = { type: "history", after, limit: MAX_HISTORY_LIMIT, id: newId("sync") };
    if (!send(envelope)) return;
    state.waiters.set(envelope.id, (reply) => {
      if (!reply) return;
      if (reply.type === "error" && reply.code === "rate_limited") {
        setTimeout(() => state.loggedIn && sync(after), (reply.retry_after ?? 1) * 1000);
        return;
      }
      if (reply.type === "history_end" && reply.more) sync(reply.last);
    });
  };

  // ---- sending -----------------------------------------------------------------------------

  // Send the head of the outbox if nothing is in flight (one at a time, in order).
  const pump = () => {
    const head = state.outbox[0];
    if (!head || head.inFlight || !state.loggedIn) return;
    if (head.retryTimer) {
      clearTimeout(head.retryTimer);
      head.retryTimer = null;
    }
    head.inFlight = send(head.envelope);
  };

  const queueMessage = (envelope, key) => {
    envelope.id = newId("m");
    const entry = { envelope, key, inFlight: false, retryTimer: null, node: null };
    entry.node = renderPending(entry);
    state.outbox.push(entry);
    appendPendingNode(entry);
    pump();
  };

  const submitComposer = () => {
    const input = $("composer-text");
    let text = input.value;
    if (!text.trim()) return;
    const conv = state.conversations.get(state.current);
    if (!conv) return;
    if (text.startsWith("//")) {
      text = text.slice(1);
    } else if (text.startsWith("/")) {
      if (!command(text)) return; // an unknown command stays in the input
      input.value = "";
      autosize();
      return;
    }
    const problem = textProblem(text);
    if (problem) {
      showAlert(problem);
      return;
    }
    if (conv.kind === "room" && !state.rooms.includes(conv.name)) {
      showAlert(`you are not in #${conv.name}: join it first`);
      return;
    }
    const envelope =
      conv.kind === "room"
        ? { type: "say", room: conv.name, text }
        : { type: "dm", to: conv.name, text };
    queueMessage(envelope, conv.key);
    input.value = "";
    autosize();
  };

  // A few of the terminal's slash commands; false (and a note) for one this page does not know.
  const command = (line) => {
    const [name, ...rest] = line.slice(1).split(/\s+/);
    const arg = rest.join(" ").trim();
    const conv = state.conversations.get(state.current);
    switch (name.toLowerCase()) {
      case "me": {
        const problem = textProblem(arg);
        if (problem || !conv) {
          showAlert(problem || "usage: /me ACTION");
          return false;
        }
        const envelope =
          conv.kind === "room"
            ? { type: "say", room: conv.name, text: arg, action: true }
            : { type: "dm", to: conv.name, text: arg, action: true };
        queueMessage(envelope, conv.key);
        return true;
      }
      case "join":
        return joinRoom(arg);
      case "leave":
        return leaveRoom(arg || (conv && conv.kind === "room" ? conv.name : ""));
      case "who":
        return who(arg || (conv && conv.kind === "room" ? conv.name : ""));
      case "msg": {
        const [to, ...words] = rest;
        const text = words.join(" ");
        if (!to || !NAME_RE.test(to) || textProblem(text)) {
          showAlert("usage: /msg USER TEXT");
          return false;
        }
        openConversation(`dm:${to}`);
        queueMessage({ type: "dm", to, text }, `dm:${to}`);
        return true;
      }
      default:
        showAlert(`unknown command /${name}: this page knows /me, /join, /leave, /who and /msg`);
        return false;
    }
  };

  const textProblem = (text) => {
    const chars = [...text].length;
    if (chars === 0) return "the message is empty";
    if (chars > MAX_TEXT_CHARS) {
      return `a message holds at most ${MAX_TEXT_CHARS} characters (this one has ${chars})`;
    }
    // C0/C1 controls other than tab and newline are refused by the server (bad_envelope).
    if (/[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/.test(text)) {
      return "the message contains control characters";
    }
    return null;
  };

  const nameProblem = (name, kind) =>
    NAME_RE.test(name)
      ? null
      : `'${name}' is not a valid ${kind}: 1-32 lowercase letters, digits, '_', '.' or '-', not starting with '.' or '-'`;

  const joinRoom = (name) => {
    const problem = nameProblem(name, "room name");
    if (problem) {
      showAlert(problem);
      return false;
    }
    return request({ type: "join", room: name }, (reply) => {
      if (!reply) return;
      if (reply.type === "joined") openConversation(`room:${reply.room}`);
      else if (reply.type === "error") showAlert(`cannot join #${name}: ${reply.message} (${reply.code})`);
    });
  };

  const leaveRoom = (name) => {
    if (!NAME_RE.test(name)) {
      showAlert("usage: /leave ROOM");
      return false;
    }
    return request({ type: "leave", room: name }, (reply) => {
      if (reply && reply.type === "error") {
        showAlert(`cannot leave #${name}: ${reply.message} (${reply.code})`);
      }
    });
  };

  const who = (name) => {
    if (!NAME_RE.test(name)) {
      showAlert("usage: /who ROOM");
      return false;
    }
    return request({ type: "who", room: name }, (reply) => {
      if (!reply) return;
      if (reply.type === "error") {
        showAlert(`who: ${reply.message} (${reply.code})`);
        return;
      }
      for (const user of reply.online) state.online.add(user);
      for (const user of reply.members) {
        if (!reply.online.includes(user)) state.online.delete(user);
      }
      const conv = conversation("room", reply.room);
      conv.members = { members: [...reply.members] };
      const online = reply.online.length ? reply.online.join(", ") : "-";
      notice(conv, [`online: ${online}; members: ${reply.members.join(", ") || "-"}`], "status");
      renderMembers();
      renderConversationList();
    });
  };

  const browseRooms = () => {
    request({ type: "rooms" }, (reply) => {
      if (!reply) return;
      if (reply.type === "error") {
        showAlert(`rooms: ${reply.message} (${reply.code})`);
        return;
      }
      const list = $("browse-list");
      list.replaceChildren(
        ...reply.rooms.map((room) => {
          const li = el("li");
          const button = el("button", "conv-button");
          button.type = "button";
          const count = room.members === 1 ? "1 member" : `${room.members} members`;
          button.append(bdi(`#${room.name}`), el("span", "hint", ` (${count}) `));
          if (room.topic) button.append(bdi(room.topic, "hint"));
          button.addEventListener("click", () => {
            if (state.rooms.includes(room.name)) openConversation(`room:${room.name}`);
            else joinRoom(room.name);
          });
          li.append(button);
          return li;
        }),
      );
      list.hidden = false;
      $("browse-rooms").setAttribute("aria-expanded", "true");
    });
  };

  // ---- views -------------------------------------------------------------------------------

  const openConversation = (key) => {
    const [kind, name] = [key.slice(0, key.indexOf(":")), key.slice(key.indexOf(":") + 1)];
    const conv = conversation(kind, name);
    state.current = conv.key;
    conv.unread = 0;
    renderHeader();
    renderTimeline();
    renderConversationList();
    if (!conv.loaded) loadOpening(conv);
    if (!conv.members) refreshMembers(conv);
    closeNavOnPhone();
  };

  // Who is in a room, and who of them online: fills the member list quietly.
  const refreshMembers = (conv) => {
    if (!conv || conv.kind !== "room" || !state.rooms.includes(conv.name) || !state.loggedIn) {
      return;
    }
    request({ type: "who", room: conv.name }, (reply) => {
      if (!reply || reply.type !== "members") return;
      for (const user of reply.online) state.online.add(user);
      conv.members = { members: [...reply.members] };
      renderMembers();
      renderConversationList();
    });
  };

  const showChat = () => {
    $("login-view").hidden = true;
    $("chat-view").hidden = false;
    $("me").textContent = state.me;
    $("login-submit").disabled = false;
    $("composer-text").focus();
  };

  const resetSession = () => {
    clearTimeout(state.reconnectTimer);
    clearInterval(state.reconnectCountdown);
    clearTimeout(state.keepaliveTimer);
    clearTimeout(state.loginTimer);
    for (const entry of state.outbox) clearTimeout(entry.retryTimer);
    Object.assign(state, {
      ws: null,
      reconnectTimer: null,
      credentials: null,
      me: null,
      loggedIn: false,
      everLoggedIn: false,
      attempt: 0,
      rooms: [],
      conversations: new Map(),
      current: null,
      highest: 0,
      seen: new Set(),
      online: new Set(),
      outbox: [],
      waiters: new Map(),
    });
    $("timeline").replaceChildren();
    $("room-list").replaceChildren();
    $("dm-list").replaceChildren();
    $("browse-list").replaceChildren();
    $("browse-list").hidden = true;
  };

  const backToLogin = (text) => {
    const unsent = state.outbox.length;
    const ws = state.ws;
    resetSession();
    if (ws) ws.close();
    $("chat-view").hidden = true;
    $("login-view").hidden = false;
    $("login-submit").disabled = false;
    const suffix = unsent ? ` (${unsent} message(s) were not sent)` : "";
    loginError(text ? text + suffix : "");
    $("login-username").focus();
  };

  const loginFailed = (text) => {
    resetSession();
    $("login-submit").disabled = false;
    loginError(text);
    $("login-password").focus();
  };

  const loginError = (text) => {
    const node = $("login-error");
    node.textContent = text;
    node.hidden = !text;
  };

  const closeNavOnPhone = () => {
    if (window.matchMedia("(max-width: 700px)").matches) {
      $("sidebar").classList.remove("open");
      $("nav-toggle").setAttribute("aria-expanded", "false");
    }
  };

  const autosize = () => {
    const input = $("composer-text");
    input.rows = Math.min(6, Math.max(1, input.value.split("\n").length));
  };

  // ---- wiring ------------------------------------------------------------------------------

  const start = () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const username = $("login-username").value.trim();
      const password = $("login-password").value;
      const problem = nameProblem(username, "username");
      if (problem) {
        loginError(problem);
        $("login-username").focus();
        return;
      }
      loginError("");
      resetSession();
      state.stopping = false;
      state.credentials = { username, password: password || null };
      $("login-password").value = "";
      $("login-submit").disabled = true;
      connect();
    });
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      submitComposer();
    });
    $("composer-text").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        submitComposer();
      }
    });
    $("composer-text").addEventListener("input", autosize);
    $("join-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = $("join-room").value.trim();
      if (joinRoom(name)) $("join-room").value = "";
    });
    $("dm-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = $("dm-user").value.trim();
      const problem = nameProblem(name, "username");
      if (problem) {
        showAlert(problem);
        return;
      }
      $("dm-user").value = "";
      openConversation(`dm:${name}`);
      $("composer-text").focus();
    });
    $("browse-rooms").setAttribute("aria-expanded", "false");
    $("browse-rooms").setAttribute("aria-controls", "browse-list");
    $("browse-rooms").addEventListener("click", () => {
      const list = $("browse-list");
      if (!list.hidden) {
        list.hidden = true;
        $("browse-rooms").setAttribute("aria-expanded", "false");
        return;
      }
      browseRooms();
    });
    $("who-button").addEventListener("click", () => {
      const conv = state.conversations.get(state.current);
      if (conv && conv.kind === "room") who(conv.name);
    });
    $("leave-button").addEventListener("click", () => {
      const conv = state.conversations.get(state.current);
      if (conv && conv.kind === "room") leaveRoom(conv.name);
    });
    $("load-older").addEventListener("click", () => {
      const conv = state.conversations.get(state.current);
      if (conv) loadOlder(conv);
    });
    $("timeline-scroll").addEventListener("scroll", () => {
      const conv = state.conversations.get(state.current);
      if (conv && conv.loaded && $("timeline-scroll").scrollTop < 40) loadOlder(conv);
    });
    $("alert-close").addEventListener("click", () => {
      $("alert").hidden = true;
      $("composer-text").focus();
    });
    $("reconnect-now").addEventListener("click", reconnectNow);
    $("logout").addEventListener("click", () => {
      state.stopping = true;
      send({ type: "bye" });
      backToLogin("");
    });
    // The network is back: no need to wait for the back-off.
    window.addEventListener("online", () => {
      if (state.reconnectTimer !== null && !state.stopping) reconnectNow();
    });
    // Messages still waiting to be sent are lost with the page: ask before leaving it.
    window.addEventListener("beforeunload", (event) => {
      if (state.outbox.length) event.preventDefault();
    });
    $("nav-toggle").addEventListener("click", () => {
      const open = $("sidebar").classList.toggle("open");
      $("nav-toggle").setAttribute("aria-expanded", open ? "true" : "false");
      if (open) $("sidebar").querySelector("button, input")?.focus();
    });
    $("login-username").focus();
  };

  start();
})();
