/* roomcast chat page.
 *
 * Plain JavaScript, no framework. Talks to the roomcast Socket.IO endpoint; every client
 * event is acknowledged with {ok: true, ...} or {ok: false, error: {code, message}}.
 *
 * Rules this file keeps:
 *  - user data is only ever inserted with textContent / text nodes, never as HTML;
 *  - messages of a room are kept sorted by seq and de-duplicated by seq, whatever the
 *    order in which history, recovery (missed) and live events arrive;
 *  - after a reconnect every joined room is re-joined with since = {epoch, seq}; the
 *    missed messages are merged, or the room is reloaded when recovery is refused;
 *  - a deleted message keeps its place, sender and time, without its text; a room
 *    remembers the seqs it was told were deleted, as a `deleted` event can come before
 *    the message it deletes (two nodes);
 *  - an edited message shows its newest text: of the versions of a seq the page is told
 *    of (history, recovery, `edited` events, in any order, possibly before the message)
 *    the one with the highest `edited` wins, and no edit brings back a deleted message.
 *
 * On a server that checks tokens the page is opened as /#token=TOKEN (the application
 * that signed the token links to it): it connects with auth {token} instead of asking
 * for a nickname, and the name shown is the one the server's welcome brings. A welcome
 * that says moderator: true (the token's claim) puts a delete control on every message.
 */
(() => {
  "use strict";

  const HISTORY_PAGE = 50;
  const ROOMS_REFRESH_MS = 5000;
  const TYPING_SEND_MS = 2000;
  const TYPING_SHOW_MS = 4000;
  const ACK_TIMEOUT_MS = 10000;
  const MAX_TEXT = 4000;
  const MAX_ROOM_NAME = 64;
  const NEAR_BOTTOM_PX = 80;
  const NEAR_TOP_PX = 60;
  const MAX_PENDING = 500;
  /** How long a send that got no answer is sent again (same id: the room stores it once). */
  const RESEND_FOR_MS = 60000;
  const RESEND_CODES = new Set(["timeout", "not_connected", "unavailable", "rate_limited"]);

  const STORE_NAME = "roomcast.nickname";
  const STORE_ROOMS = "roomcast.rooms";
  const STORE_ACTIVE = "roomcast.active";
  const STORE_UNSENT = "roomcast.unsent"; // this tab's messages not yet confirmed
  const STORE_TOKEN = "roomcast.token"; // this tab's token, from the address's #token=

  // The page may be mounted under a prefix (/chat/): everything is relative to it.
  const BASE_PATH = location.pathname.replace(/[^/]*$/, "") || "/";
  const SOCKET_PATH = BASE_PATH + "ws/socket.io";

  const $ = (id) => document.getElementById(id);
  const ui = {
    app: $("app"),
    loginForm: $("login-form"),
    nickname: $("nickname"),
    connect: $("connect"),
    status: $("status"),
    sidebar: $("sidebar"),
    joinForm: $("join-form"),
    roomName: $("room-name"),
    join: $("join"),
    joined: $("joined"),
    joinedEmpty: $("joined-empty"),
    rooms: $("rooms"),
    refreshRooms: $("refresh-rooms"),
    roomTitle: $("room-title"),
    memberCount: $("member-count"),
    messages: $("messages"),
    jump: $("jump"),
    typing: $("typing"),
    composer: $("composer"),
    text: $("text"),
    send: $("send"),
    members: $("members"),
    toggleRooms: $("toggle-rooms"),
    toggleMembers: $("toggle-members"),
    backdrop: $("backdrop"),
    notice: $("notice"),
    whoami: $("whoami"),
  };

  // ---------------------------------------------------------------- storage

  const store = {
    get(key, fallback) {
      try {
        const raw = localStorage.getItem(key);
        return raw === null ? fallback : JSON.parse(raw);
      } catch {
        return fallback;
      }
    },
    set(key, value) {
      try {
        localStorage.setItem(key, JSON.stringify(value));
      } catch {
        /* storage unavailable (private mode): the page works without it */
      }
    },
  };

  /**
   * Messages sent but not yet confirmed, kept in this tab's session storage until the
   * server confirms them or the page gives up on them: a page reloaded meanwhile (or
   * restored after a crash) sends them again, with their ids, once it is back in their
   * rooms — the room stores each once however many tries reach it.
   */
  const unsent = {
    all() {
      try {
        const list = JSON.parse(sessionStorage.getItem(STORE_UNSENT) || "[]");
        return Array.isArray(list) ? list : [];
      } catch {
        return [];
      }
    },
    save(list) {
      try {
        sessionStorage.setItem(STORE_UNSENT, JSON.stringify(list));
      } catch {
        /* storage unavailable: a reload then loses what was not confirmed */
      }
    },
    keep(entry) {
      this.save([...this.all().filter((e) => e.id !== entry.id), entry]);
    },
    drop(id) {
      this.save(this.all().filter((e) => e.id !== id));
    },
  };

  /**
   * The token the page was opened with (/#token=TOKEN), or null: the server then names
   * the user. Read once and taken out of the address at once — it would otherwise stay in
   * view, in screenshots and in the tab's history — and kept in this tab's session
   * storage only, so that a reload signs in again with it.
   */
  function takeToken() {
    const params = new URLSearchParams(location.hash.slice(1));
    const given = params.get("token");
    if (given) {
      params.delete("token");
      const rest = params.toString();
      const address = location.pathname + location.search + (rest ? `#${rest}` : "");
      history.replaceState(history.state, "", address);
      try {
        sessionStorage.setItem(STORE_TOKEN, given);
      } catch {
        /* storage unavailable: a reload then needs the link again */
      }
      return given;
    }
    try {
      return sessionStorage.getItem(STORE_TOKEN) || null;
    } catch {
      return null;
    }
  }

  // ---------------------------------------------------------------- state

  const token = takeToken();

  /** @type {import("socket.io-client").Socket | null} */
  let socket = null;
  let me = null; // {id, name} from the welcome event
  let moderator = false; // the welcome said so: this connection may delete any message
  let currentName = ""; // the nickname the current connection was opened with
  const myIds = new Set(); // user ids of this page's connections (one per connection)
  let restored = false; // remembered rooms re-joined once per page load
  const rooms = new Map(); // room id -> Room
  let order = []; // joined room ids, tab order
  let activeId = null;
  const pending = new Map(); // room id -> events that arrived before the join ack
  let joinsInFlight = 0;
  let roomsTimer = null;
  let roomsSoon = null;
  let noticeTimer = null;
  let lastRoomList = [];
  let refusal = null; // why the server would not let this page in (unauthorized), if it did not

  class ChatError extends Error {
    constructor(code, message) {
      super(message);
      this.code = code;
    }
  }

  function newRoom(info) {
    return {
      id: info.id,
      name: String(info.name),
      epoch: null,
      seq: 0, // highest seq held
      joinSeq: 0,
      loaded: false, // initial history loaded for the current epoch
      messages: [], // sorted by seq
      bySeq: new Map(),
      deleted: new Set(), // seqs deleted, shown so whenever their message comes
      edits: new Map(), // seq -> the newest edit of a message not held (yet)
      nodes: new Map(), // seq -> rendered element
      members: new Map(), // user id -> {id, name}
      typing: new Map(), // user id -> {name, timer}
      lastTypingSent: 0,
      hasMore: false,
      loadingOlder: false,
      syncing: false,
      gapBusy: false,
      holesTried: new Set(),
      unread: 0,
      atBottom: true,
      scrollTop: 0,
      error: null,
    };
  }

  const activeRoom = () => (activeId === null ? null : rooms.get(activeId) || null);

  function findRoomByName(name) {
    for (const room of rooms.values()) if (room.name === name) return room;
    return null;
  }

  function rememberRooms() {
    store.set(STORE_ROOMS, order.map((id) => rooms.get(id)?.name).filter(Boolean));
    const room = activeRoom();
    store.set(STORE_ACTIVE, room ? room.name : null);
  }

  // ---------------------------------------------------------------- requests

  async function request(event, payload) {
    if (!socket) throw new ChatError("not_connected", "Not connected.");
    let res;
    try {
      res = await socket.timeout(ACK_TIMEOUT_MS).emitWithAck(event, payload);
    } catch {
      throw new ChatError("timeout", `The server did not answer (${event}).`);
    }
    if (!res || res.ok !== true) {
      const err = (res && res.error) || {};
      throw new ChatError(err.code || "error", err.message || `${event} failed.`);
    }
    return res;
  }

  // ---------------------------------------------------------------- status and notices

  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text || state;
    ui.status.title = state === "connected" && me ? `Connected as ${me.name}` : text || state;
    const connected = state === "connected";
    ui.app.dataset.connected = String(connected);
    updateComposer();
    updateConnectButton();
  }

  /** "Connect" is only offered when it would change something: a new name, or no connection. */
  function updateConnectButton() {
    const name = ui.nickname.value.trim();
    const live = socket !== null && socket.active;
    ui.connect.disabled = name === "" || (live && name === currentName);
    ui.connect.textContent = live && name !== currentName ? "Switch" : "Connect";
  }

  /** A notice; a sticky one stays until clicked away (or replaced). */
  function showNotice(message, kind = "error", { sticky = false } = {}) {
    ui.notice.textContent = message;
    ui.notice.dataset.kind = kind;
    ui.notice.classList.remove("hidden");
    clearTimeout(noticeTimer);
    if (!sticky) noticeTimer = setTimeout(() => ui.notice.classList.add("hidden"), 6000);
  }

  /**
   * The server will not let this page in (code "unauthorized": no token, or one expired,
   * badly signed or malformed). socket.io does not retry a refused connect: say so where
   * it stays in view, as no later attempt of this page can succeed.
   */
  function refuse(message) {
    refusal = token
      ? `Not signed in: ${message}. Open the chat again with a new link.`
      : `Not signed in: ${message}. This server checks who you are: open the chat from a link that carries a token.`;
    setStatus("refused", "not signed in");
    showNotice(refusal, "error", { sticky: true });
    if (!activeRoom()) renderMessages();
  }

  // ---------------------------------------------------------------- connection

  function connect(name) {
    if (typeof io !== "function") {
      setStatus("error", "client library missing");
      showNotice("The Socket.IO client is missing: run scripts/build-web.sh.");
      return;
    }
    if (socket) {
      socket.removeAllListeners();
      socket.io.removeAllListeners();
      socket.disconnect();
    }
    me = null;
    moderator = false; // until this connection's welcome says otherwise
    if (name !== currentName) myIds.clear();
    currentName = name;
    refusal = null;
    setStatus("connecting", "connecting…");
    const s = io({
      path: SOCKET_PATH,
      // With a token the server names the user: a name sent along would be ignored.
      auth: token ? { token } : { name },
      // WebSocket first (the server's leanest path), long-polling if it cannot connect.
      transports: ["websocket", "polling"],
      tryAllTransports: true,
      forceNew: true,
      reconnectionDelay: 500,
      reconnectionDelayMax: 5000,
      timeout: ACK_TIMEOUT_MS,
    });
    socket = s;
    updateConnectButton();

    s.on("connect", () => {
      refusal = null;
      setStatus("connected", "connected");
      startRoomsTimer();
      refreshRooms();
      if (rooms.size > 0) {
        resyncAll();
      } else if (!restored) {
        restored = true;
        restoreRooms().then(resendUnsent);
      }
    });

    s.on("disconnect", (reason) => {
      stopRoomsTimer();
      for (const room of rooms.values()) clearTyping(room);
      renderTyping();
      if (s.active) {
        setStatus("reconnecting", "reconnecting…");
      } else if (reason === "io server disconnect") {
        setStatus("offline", "disconnected by the server");
      } else {
        setStatus("offline", "offline");
      }
    });

    // The server ends the connection when its token expires (no refresh was sent): the
    // same token cannot sign in again.
    s.on("expired", (data) => refuse((data && data.message) || "the token has expired"));

    s.on("connect_error", (err) => {
      if (s.active) {
        setStatus("reconnecting", "reconnecting…");
        return;
      }
      // Refused by the server (e.g. an invalid nickname): socket.io does not retry.
      const data = err && err.data;
      const message = (data && data.message) || err.message || "connection refused";
      if (data && data.code === "unauthorized") {
        refuse(message);
        return;
      }
      setStatus("refused", "refused");
      showNotice(`Connection refused: ${message}`);
      ui.nickname.focus();
    });

    s.io.on("reconnect_attempt", (attempt) => {
      setStatus("reconnecting", `reconnecting… (${attempt})`);
    });

    s.on("welcome", (data) => {
      const user = data && data.user;
      if (!user) return;
      // Each welcome (a reconnect's too) says again who this is and what it may do.
      const changed = !me || me.id !== user.id || moderator !== (data.moderator === true);
      me = { id: user.id, name: String(user.name) };
      moderator = data.moderator === true;
      myIds.add(user.id);
      if (token) {
        ui.whoami.textContent = me.name;
        ui.whoami.title = `Signed in as ${me.name}`;
      }
      setStatus("connected", "connected");
      if (changed) {
        // Re-rendered: which messages are mine, and which have controls, may have changed.
        renderMessages();
        renderMembers();
      }
    });

    s.on("message", onMessage);
    s.on("deleted", onDeleted);
    s.on("edited", onEdited);
    s.on("presence", onPresence);
    s.on("typing", onTyping);
  }

  function queuePending(roomId, kind, data) {
    if (joinsInFlight === 0) return;
    let list = pending.get(roomId);
    if (!list) pending.set(roomId, (list = []));
    if (list.length < MAX_PENDING) list.push([kind, data]);
  }

  function drainPending(room) {
    const list = pending.get(room.id);
    if (!list) return;
    pending.delete(room.id);
    for (const [kind, data] of list) {
      if (kind === "message") onMessage(data);
      else if (kind === "presence") onPresence(data);
      else if (kind === "deleted") onDeleted(data);
      else if (kind === "edited") onEdited(data);
    }
  }

  // ---------------------------------------------------------------- rooms: join / leave / resync

  function validRoomName(name) {
    const length = [...name].length;
    return length >= 1 && length <= MAX_ROOM_NAME && !/[\u0000-\u001f\u007f]/.test(name);
  }

  // Resolves once the room is joined and shown; with waitHistory (the default) only after
  // its first page of history has loaded too (that load reports its own errors).
  async function joinRoom(name, { activate = true, waitHistory = true } = {}) {
    const existing = findRoomByName(name);
    if (existing) {
      if (activate) setActive(existing.id);
      return existing;
    }
    joinsInFlight += 1;
    let res;
    try {
      res = await request("join", { room: name });
    } finally {
      joinsInFlight -= 1;
    }
    let room = rooms.get(res.room.id);
    if (room) {
      // Joined meanwhile (e.g. by a reconnect); just refresh the membership.
      applyMembers(room, res.members);
      if (activate) setActive(room.id);
      return room;
    }
    room = newRoom(res.room);
    room.epoch = res.epoch;
    room.joinSeq = Number(res.seq) || 0;
    applyMembers(room, res.members);
    rooms.set(room.id, room);
    order.push(room.id);
    rememberRooms();
    if (activate || activeId === null) setActive(room.id);
    else renderJoined();
    drainPending(room);
    scheduleRoomsRefresh();
    const loading = loadInitialHistory(room);
    if (waitHistory) await loading;
    return room;
  }

  async function restoreRooms() {
    const names = store.get(STORE_ROOMS, []);
    const active = store.get(STORE_ACTIVE, null);
    if (!Array.isArray(names)) return;
    for (const name of names) {
      if (typeof name !== "string" || !validRoomName(name)) continue;
      try {
        await joinRoom(name, { activate: name === active });
      } catch (err) {
        showNotice(`Could not re-join ${name}: ${err.message}`);
      }
    }
  }

  async function leaveRoom(id) {
    const room = rooms.get(id);
    if (!room) return;
    try {
      if (socket && socket.connected) await request("leave", { room: room.id });
    } catch (err) {
      showNotice(`Could not leave ${room.name}: ${err.message}`);
      return;
    }
    clearTyping(room);
    rooms.delete(id);
    const index = order.indexOf(id);
    order = order.filter((x) => x !== id);
    if (activeId === id) {
      const next = order[Math.min(index, order.length - 1)];
      setActive(next === undefined ? null : next);
    } else {
      renderJoined();
    }
    rememberRooms();
    scheduleRoomsRefresh();
  }

  function applyMembers(room, members) {
    room.members = new Map();
    for (const user of members || []) {
      if (user && user.id !== undefined) room.members.set(user.id, user);
    }
    if (room.id === activeId) renderMembers();
  }

  function resetRoom(room) {
    room.messages = [];
    room.bySeq = new Map();
    room.deleted = new Set(); // the seqs of the old epoch
    room.edits = new Map();
    room.nodes = new Map();
    room.holesTried = new Set();
    room.seq = 0;
    room.loaded = false;
    room.hasMore = false;
    room.atBottom = true;
    if (room.id === activeId) renderMessages();
  }

  function rekeyRoom(room, newId) {
    const oldId = room.id;
    rooms.delete(oldId);
    room.id = newId;
    rooms.set(newId, room);
    order = order.map((x) => (x === oldId ? newId : x));
    if (activeId === oldId) activeId = newId;
  }

  async function resyncAll() {
    const list = order.map((id) => rooms.get(id)).filter(Boolean);
    await Promise.all(list.map((room) => resync(room)));
    renderJoined();
    scheduleRoomsRefresh();
  }

  /** Re-join a room after a reconnect and recover exactly what was missed. */
  async function resync(room) {
    const payload = { room: room.name };
    const canRecover = room.loaded && room.epoch !== null;
    if (canRecover) payload.since = { epoch: room.epoch, seq: room.seq };
    room.syncing = true;
    joinsInFlight += 1;
    let res;
    try {
      res = await request("join", payload);
    } catch (err) {
      room.error = err.message;
      showNotice(`Could not re-join ${room.name}: ${err.message}`);
      return;
    } finally {
      joinsInFlight -= 1;
      room.syncing = false;
    }
    room.error = null;
    if (res.room.id !== room.id) rekeyRoom(room, res.room.id);
    room.name = String(res.room.name);
    applyMembers(room, res.members);
    const latest = Number(res.seq) || 0;
    if (canRecover && res.recovered === true && res.epoch === room.epoch) {
      // What changed among the messages held while away: each in place of the one held.
      for (const m of Array.isArray(res.changed) ? res.changed : []) updateHeld(room, m);
      addMessages(room, res.missed || [], { live: true });
      drainPending(room);
      checkGaps(room, latest);
    } else {
      // Recovery refused (history reset, epoch changed, too far behind): reload.
      room.epoch = res.epoch;
      room.joinSeq = latest;
      resetRoom(room);
      drainPending(room);
      await loadInitialHistory(room);
    }
  }

  // ---------------------------------------------------------------- history

  async function loadInitialHistory(room) {
    room.syncing = true;
    let ok = false;
    try {
      const res = await request("history", { room: room.id, limit: HISTORY_PAGE });
      const msgs = Array.isArray(res.messages) ? res.messages : [];
      addMessages(room, msgs, { live: false });
      room.hasMore = msgs.length >= HISTORY_PAGE && room.messages.length > 0 && room.messages[0].seq > 1;
      room.loaded = true;
      room.seq = Math.max(room.seq, room.joinSeq);
      ok = true;
    } catch (err) {
      room.error = err.message;
      showNotice(`Could not load the history of ${room.name}: ${err.message}`);
    } finally {
      room.syncing = false;
    }
    if (room.id === activeId) {
      renderEdge();
      scrollToBottom();
      fillViewport(room);
    }
    if (ok) checkGaps(room, room.joinSeq);
  }

  async function loadOlder(room) {
    if (!room || room.loadingOlder || !room.hasMore || room.messages.length === 0) return;
    room.loadingOlder = true;
    if (room.id === activeId) renderEdge();
    const before = room.messages[0].seq;
    try {
      const res = await request("history", { room: room.id, before, limit: HISTORY_PAGE });
      const msgs = Array.isArray(res.messages) ? res.messages : [];
      addMessages(room, msgs, { live: false });
      if (msgs.length < HISTORY_PAGE || room.messages[0].seq <= 1) room.hasMore = false;
    } catch (err) {
      showNotice(`Could not load older messages: ${err.message}`);
    } finally {
      room.loadingOlder = false;
    }
    if (room.id === activeId) {
      renderEdge();
      fillViewport(room);
    }
  }

  /** Load more history while the pane is too short to scroll (so scrolling up can page). */
  function fillViewport(room) {
    if (room.id !== activeId || !room.hasMore || room.loadingOlder) return;
    const pane = ui.messages;
    if (pane.scrollHeight <= pane.clientHeight + NEAR_TOP_PX) loadOlder(room);
  }

  /** Fill holes in the seq sequence (and the tail up to `upTo`) from history. Bounded. */
  async function checkGaps(room, upTo = 0) {
    if (room.gapBusy || !room.loaded) return;
    room.gapBusy = true;
    try {
      for (let round = 0; round < 10; round += 1) {
        const hole = findHole(room, upTo);
        if (!hole) break;
        room.holesTried.add(hole.before);
        const res = await request("history", {
          room: room.id,
          before: hole.before,
          limit: Math.min(100, hole.count),
        });
        if (!rooms.has(room.id)) break;
        addMessages(room, Array.isArray(res.messages) ? res.messages : [], { live: false });
      }
    } catch {
      /* a later reconnect or live message retries */
    } finally {
      room.gapBusy = false;
    }
  }

  function findHole(room, upTo) {
    const list = room.messages;
    if (list.length === 0) return null;
    const last = list[list.length - 1].seq;
    if (upTo > last && !room.holesTried.has(upTo + 1)) {
      return { before: upTo + 1, count: upTo - last };
    }
    for (let i = list.length - 1; i > 0; i -= 1) {
      const a = list[i - 1].seq;
      const b = list[i].seq;
      if (b - a > 1 && !room.holesTried.has(b)) return { before: b, count: b - a - 1 };
    }
    return null;
  }

  // ---------------------------------------------------------------- messages

  function lowerBound(list, seq) {
    let lo = 0;
    let hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (list[mid].seq < seq) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Merge messages into a room: de-duplicated by seq, kept sorted by seq. */
  function addMessages(room, msgs, { live }) {
    const added = [];
    for (const incoming of msgs) {
      if (!incoming || typeof incoming.seq !== "number") continue;
      if (room.epoch !== null && incoming.epoch !== undefined && incoming.epoch !== room.epoch) continue;
      if (room.bySeq.has(incoming.seq)) {
        // Held already: a read made since it was deleted or edited (history, missed) says so.
        updateHeld(room, incoming);
        continue;
      }
      let m = incoming;
      if (room.deleted.has(m.seq)) m = tombstone(incoming);
      else m = newest(incoming, room.edits.get(m.seq)); // an edit told before its message
      room.edits.delete(m.seq);
      room.bySeq.set(m.seq, m);
      const list = room.messages;
      if (list.length === 0 || list[list.length - 1].seq < m.seq) list.push(m);
      else list.splice(lowerBound(list, m.seq), 0, m);
      if (m.seq > room.seq) room.seq = m.seq;
      added.push(m);
    }
    if (added.length === 0) return added;
    if (room.id === activeId) {
      insertRendered(room, added, live);
    } else if (live) {
      room.unread += added.filter((m) => !isMine(m) && m.deleted !== true).length;
      renderJoined();
    }
    return added;
  }

  function onMessage(m) {
    if (!m || m.room === undefined) return;
    const room = rooms.get(m.room);
    if (!room) {
      queuePending(m.room, "message", m);
      return;
    }
    if (room.epoch !== null && m.epoch !== undefined && m.epoch !== room.epoch) {
      // The room's history was reset: start over from the new epoch.
      if (!room.syncing) resync(room);
      return;
    }
    const previous = room.seq;
    const added = addMessages(room, [m], { live: true });
    if (m.user && room.typing.has(m.user.id)) {
      clearTimeout(room.typing.get(m.user.id).timer);
      room.typing.delete(m.user.id);
      if (room.id === activeId) renderTyping();
    }
    if (added.length && !room.syncing && room.loaded && m.seq > previous + 1) {
      checkGaps(room);
    }
  }

  const isMine = (m) => Boolean(m.user && myIds.has(m.user.id));

  /** This connection's user deletes its own messages (an earlier connection was another
   *  user), a moderator anyone's. */
  const canDelete = (m) =>
    Boolean(me && m.deleted !== true && (moderator || (m.user && m.user.id === me.id)));

  /** Only the sender edits, as for deleting (a moderator may delete, never edit). */
  const canEdit = (m) => Boolean(me && m.user && m.user.id === me.id && m.deleted !== true);

  const tombstone = (m) => ({ ...m, text: "", deleted: true });

  const editedAt = (m) => (typeof m.edited === "number" ? m.edited : -1);

  /** The message `m` with the text of `edit`, if that is a later edit of it (a deleted
   *  message stays deleted). */
  const newest = (m, edit) =>
    edit && m.deleted !== true && editedAt(edit) > editedAt(m)
      ? { ...m, text: String(edit.text ?? ""), edited: edit.edited }
      : m;

  /** A read or a recovery brought a held message as it is now: deleted, or edited later. */
  function updateHeld(room, m) {
    if (!m || typeof m.seq !== "number" || !room.bySeq.has(m.seq)) return;
    if (m.deleted === true) markDeleted(room, m.seq);
    else applyEdit(room, m);
  }

  function onDeleted(ev) {
    if (!ev || typeof ev.seq !== "number") return;
    const room = rooms.get(ev.room);
    if (!room) {
      queuePending(ev.room, "deleted", ev);
      return;
    }
    markDeleted(room, ev.seq);
  }

  /** Show the room's message seq as deleted: now if it is held, else when it comes. */
  function markDeleted(room, seq) {
    room.deleted.add(seq);
    const m = room.bySeq.get(seq);
    if (!m || m.deleted === true) return;
    const gone = tombstone(m);
    room.bySeq.set(seq, gone);
    room.messages[lowerBound(room.messages, seq)] = gone;
    const node = room.nodes.get(seq);
    if (node) showDeleted(node);
  }

  function onEdited(m) {
    if (!m || typeof m.seq !== "number" || typeof m.edited !== "number") return;
    const room = rooms.get(m.room);
    if (!room) {
      queuePending(m.room, "edited", m);
      return;
    }
    if (room.epoch !== null && m.epoch !== undefined && m.epoch !== room.epoch) return;
    applyEdit(room, m);
  }

  /**
   * Show the room's message m.seq with the text of edit `m` if that is the newest known:
   * now if the message is held, else when it comes. Edits can come in any order (two
   * nodes), and before their message; none brings back a deleted message.
   */
  function applyEdit(room, m) {
    if (typeof m.edited !== "number" || room.deleted.has(m.seq)) return;
    const held = room.bySeq.get(m.seq);
    if (!held) {
      if (editedAt(m) > editedAt(room.edits.get(m.seq) || {})) {
        room.edits.delete(m.seq); // re-inserted last: the oldest entry goes first
        room.edits.set(m.seq, m);
        if (room.edits.size > MAX_PENDING) room.edits.delete(room.edits.keys().next().value);
      }
      return;
    }
    const now = newest(held, m); // a deleted message stays as it is
    if (now === held) return;
    room.bySeq.set(m.seq, now);
    room.messages[lowerBound(room.messages, m.seq)] = now;
    const node = room.nodes.get(m.seq);
    if (node) showText(node, now);
  }

  async function deleteMessage(seq, button) {
    const room = activeRoom();
    if (!room) return;
    const hadFocus = document.activeElement === button;
    button.disabled = true;
    try {
      await request("delete", { room: room.id, seq });
      // The room's deleted event says so too; the answer is enough if it comes first.
      if (rooms.get(room.id) === room) markDeleted(room, seq);
    } catch (err) {
      showNotice(`Could not delete the message: ${err.message}`);
      button.disabled = false;
    }
    // The control went with the text: keep the keyboard in the chat.
    if (hadFocus && !button.isConnected) ui.text.focus();
  }

  /** Inline editing: the message's text turns into a box holding it; Enter saves, Escape
   *  cancels. The box is the row's, so a re-render (another room) drops it: cancelled. */
  function startEdit(seq, row) {
    const room = activeRoom();
    const m = room && room.bySeq.get(seq);
    if (!m || m.deleted === true) return;
    let box = row.querySelector(".editor");
    if (!box) {
      box = document.createElement("textarea");
      box.className = "editor";
      box.rows = 1;
      box.maxLength = MAX_TEXT;
      box.setAttribute("aria-label", "Edit message");
      box.value = String(m.text ?? "");
      box.addEventListener("keydown", (event) => {
        if (event.isComposing || event.keyCode === 229) return;
        if (event.key === "Escape") {
          event.stopPropagation(); // the drawers stay as they are
          if (!box.readOnly) endEdit(row, true);
        } else if (event.key === "Enter" && !event.shiftKey) {
          event.preventDefault();
          if (!box.readOnly) saveEdit(room, seq, row, box);
        }
      });
      box.addEventListener("input", () => growBox(box));
      row.classList.add("editing");
      row.querySelector(".body").append(box);
      growBox(box);
    }
    box.focus();
    box.setSelectionRange(box.value.length, box.value.length);
  }

  function growBox(box) {
    box.style.height = "auto";
    box.style.height = `${Math.min(box.scrollHeight, 240)}px`;
  }

  /** The row shows its message's text again; the keyboard goes back to the composer. */
  function endEdit(row, focus) {
    row.querySelector(".editor")?.remove();
    row.classList.remove("editing");
    const control = row.querySelector(".edit");
    if (control) control.disabled = false;
    if (focus) ui.text.focus();
  }

  async function saveEdit(room, seq, row, box) {
    const held = room.bySeq.get(seq);
    const text = box.value.replace(/\s+$/, "");
    if (!held || held.deleted === true || text === String(held.text ?? "")) {
      endEdit(row, true); // nothing to change
      return;
    }
    if (text.trim() === "") {
      showNotice("A message cannot be empty: delete it instead.");
      return;
    }
    if ([...text].length > MAX_TEXT) {
      showNotice(`A message is at most ${MAX_TEXT} characters.`);
      return;
    }
    const control = row.querySelector(".edit");
    box.readOnly = true;
    if (control) control.disabled = true;
    try {
      const res = await request("edit", { room: room.id, seq, text });
      // The room's edited event says so too; the answer is enough if it comes first.
      if (res.message && rooms.get(room.id) === room) applyEdit(room, res.message);
    } catch (err) {
      showNotice(`Could not edit the message: ${err.message}`);
    }
    endEdit(row, document.activeElement === box);
  }

  /**
   * Messages are sent one at a time, each after the previous one was acknowledged, so the
   * room receives them in the order they were typed whatever the server's concurrency.
   */
  let sendQueue = Promise.resolve();

  function sendMessage() {
    const room = activeRoom();
    if (!room) return;
    const raw = ui.text.value;
    const text = raw.replace(/\s+$/, "");
    if (text.trim() === "") return;
    if ([...text].length > MAX_TEXT) {
      showNotice(`A message is at most ${MAX_TEXT} characters.`);
      return;
    }
    if (!socket || !socket.connected) {
      showNotice("Not connected: the message was not sent.");
      return;
    }
    ui.text.value = "";
    autoGrow();
    ui.text.focus();
    room.lastTypingSent = 0;
    const id = newMessageId();
    const deadline = Date.now() + RESEND_FOR_MS;
    unsent.keep({ id, room: room.name, text, raw, deadline });
    sendQueue = sendQueue.then(() => deliver(room, text, raw, id, deadline));
  }

  /** What this tab sent before it was reloaded and never saw confirmed: sent again. */
  function resendUnsent() {
    const now = Date.now();
    for (const entry of unsent.all()) {
      const room = [...rooms.values()].find((r) => r.name === entry.room);
      const valid = entry && typeof entry.id === "string" && typeof entry.text === "string";
      if (!valid || !room || !(entry.deadline > now)) {
        if (entry && typeof entry.id === "string") unsent.drop(entry.id);
        continue;
      }
      showNotice("Sending again what was not confirmed before the page was reloaded…", "info");
      sendQueue = sendQueue.then(() =>
        deliver(room, entry.text, String(entry.raw ?? entry.text), entry.id, entry.deadline)
      );
    }
  }

  /** A message id of this page's own: random, so unique in any room (see docs/protocol.md). */
  function newMessageId() {
    const bytes = crypto.getRandomValues(new Uint8Array(12));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /**
   * Sends the message; one that got no answer, or that the server could not take or
   * confirm, is sent again with the same id for up to RESEND_FOR_MS, once connected and
   * the room re-joined — the room stores it once however many tries reach it.
   */
  async function deliver(room, text, raw, id, deadline) {
    let pause = 1000;
    for (;;) {
      if (rooms.get(room.id) !== room) {
        unsent.drop(id); // left meanwhile
        return;
      }
      try {
        const res = await request("send", { room: room.id, text, id });
        unsent.drop(id);
        if (res.message && rooms.get(room.id) === room) {
          addMessages(room, [res.message], { live: true });
        }
        if (room.id === activeId) scrollToBottom();
        return;
      } catch (err) {
        if (RESEND_CODES.has(err.code) && Date.now() + pause < deadline) {
          showNotice("Not confirmed yet: sending the message again…", "info");
          await sleep(pause);
          pause = Math.min(pause * 2, 8000);
          while (Date.now() < deadline && !(socket && socket.connected && !room.syncing)) {
            await sleep(200);
          }
          continue;
        }
        unsent.drop(id);
        // Without an answer, or when the store could not say, the message may have been
        // stored all the same: it then shows up in the room, so it is not "not sent".
        if (err.code === "timeout") {
          showNotice("Not confirmed: the server did not answer. If the message does not show up, send it again.");
        } else if (err.code === "unavailable" && err.message.includes("may have been stored")) {
          showNotice(`Not confirmed: ${err.message}`);
        } else {
          showNotice(`Not sent: ${err.message}`);
        }
        if (ui.text.value === "" && room.id === activeId) {
          ui.text.value = raw;
          autoGrow();
        }
        return;
      }
    }
  }

  // ---------------------------------------------------------------- presence and typing

  function onPresence(ev) {
    if (!ev || !ev.user) return;
    const room = rooms.get(ev.room);
    if (!room) {
      queuePending(ev.room, "presence", ev);
      return;
    }
    if (ev.event === "join") {
      room.members.set(ev.user.id, ev.user);
    } else if (ev.event === "leave") {
      room.members.delete(ev.user.id);
      const typing = room.typing.get(ev.user.id);
      if (typing) {
        clearTimeout(typing.timer);
        room.typing.delete(ev.user.id);
      }
    }
    if (room.id === activeId) {
      renderMembers();
      renderTyping();
    }
    // The room list's count of a joined room comes from its members here: no request.
    scheduleRoomsRender();
  }

  function onTyping(ev) {
    if (!ev || !ev.user) return;
    if (me && ev.user.id === me.id) return;
    const room = rooms.get(ev.room);
    if (!room) return;
    const previous = room.typing.get(ev.user.id);
    if (previous) clearTimeout(previous.timer);
    const timer = setTimeout(() => {
      room.typing.delete(ev.user.id);
      if (room.id === activeId) renderTyping();
    }, TYPING_SHOW_MS);
    room.typing.set(ev.user.id, { name: String(ev.user.name), timer });
    if (room.id === activeId) renderTyping();
  }

  function clearTyping(room) {
    for (const entry of room.typing.values()) clearTimeout(entry.timer);
    room.typing.clear();
  }

  function sendTyping() {
    const room = activeRoom();
    if (!room || !socket || !socket.connected || ui.text.value.trim() === "") return;
    const now = Date.now();
    if (now - room.lastTypingSent < TYPING_SEND_MS) return;
    room.lastTypingSent = now;
    request("typing", { room: room.id }).catch(() => {});
  }

  // ---------------------------------------------------------------- room list

  async function refreshRooms() {
    if (!socket || !socket.connected) return;
    try {
      // The rooms people are in, most members first: what the server reads for it is the
      // cluster's memberships, not every room ever made.
      const res = await request("rooms", { occupied: true });
      lastRoomList = Array.isArray(res.rooms) ? res.rooms : [];
      renderRooms();
    } catch {
      /* the next tick retries */
    }
  }

  function scheduleRoomsRefresh() {
    if (roomsSoon) return;
    roomsSoon = setTimeout(() => {
      roomsSoon = null;
      refreshRooms();
    }, 300);
  }

  let roomsRenderSoon = null;

  function scheduleRoomsRender() {
    if (roomsRenderSoon) return;
    roomsRenderSoon = setTimeout(() => {
      roomsRenderSoon = null;
      renderRooms();
    }, 300);
  }

  function startRoomsTimer() {
    stopRoomsTimer();
    roomsTimer = setInterval(() => {
      if (!document.hidden) refreshRooms();
    }, ROOMS_REFRESH_MS);
  }

  function stopRoomsTimer() {
    if (roomsTimer) clearInterval(roomsTimer);
    roomsTimer = null;
  }

  // ---------------------------------------------------------------- rendering

  function colorFor(id) {
    const n = Math.abs(Number(id) || 0);
    return `hsl(${(n * 137) % 360} 55% 36%)`;
  }

  function formatTime(ts) {
    const date = new Date(Number(ts));
    if (Number.isNaN(date.getTime())) return ["", ""];
    const today = new Date();
    const sameDay = date.toDateString() === today.toDateString();
    const short = sameDay
      ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : date.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
    return [short, date.toLocaleString()];
  }

  /** Append text to a node, turning http(s) URLs into links. Text nodes only. */
  function appendText(parent, text) {
    const pattern = /https?:\/\/[^\s<>"']+/g;
    let last = 0;
    let match;
    while ((match = pattern.exec(text)) !== null) {
      let url = match[0];
      const trailing = url.match(/[.,;:!?)\]}]+$/);
      if (trailing) url = url.slice(0, -trailing[0].length);
      const start = match.index;
      if (start > last) parent.appendChild(document.createTextNode(text.slice(last, start)));
      let safe = null;
      try {
        const parsed = new URL(url);
        if (parsed.protocol === "http:" || parsed.protocol === "https:") safe = parsed.href;
      } catch {
        safe = null;
      }
      if (safe) {
        const a = document.createElement("a");
        a.href = safe;
        a.target = "_blank";
        a.rel = "noopener noreferrer nofollow";
        a.textContent = url;
        parent.appendChild(a);
      } else {
        parent.appendChild(document.createTextNode(url));
      }
      last = start + url.length;
      pattern.lastIndex = last;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function messageNode(m) {
    const row = document.createElement("div");
    row.className = "message";
    if (isMine(m)) row.classList.add("mine");
    row.dataset.seq = String(m.seq);
    if (m.user && m.user.id !== undefined) row.dataset.userId = String(m.user.id);

    const author = document.createElement("span");
    author.className = "author";
    author.textContent = m.user && m.user.name !== undefined ? String(m.user.name) : "?";
    if (m.user) author.style.color = colorFor(m.user.id);

    const time = document.createElement("time");
    time.className = "time";
    const [short, full] = formatTime(m.ts);
    time.textContent = short;
    if (full) {
      time.title = full;
      time.dateTime = new Date(Number(m.ts)).toISOString();
    }

    // The text, and after it whether it was edited; an editor takes their place.
    const body = document.createElement("div");
    body.className = "body";
    const text = document.createElement("div");
    text.className = "text";
    body.append(text);

    row.append(author, time, body);
    if (m.deleted === true) {
      showDeleted(row);
      return row;
    }
    showText(row, m);
    const actions = document.createElement("span");
    actions.className = "actions";
    if (canEdit(m)) {
      actions.append(actionButton("edit", "Edit", () => startEdit(m.seq, row)));
    }
    if (canDelete(m)) {
      actions.append(actionButton("delete", "Delete", (button) => deleteMessage(m.seq, button)));
    }
    if (actions.childElementCount > 0) row.append(actions);
    return row;
  }

  /** A control on a message ("Edit message", "Delete message"): shown on hover and focus. */
  function actionButton(kind, label, act) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `action ${kind}`;
    button.title = `${label} message`;
    button.setAttribute("aria-label", `${label} message`);
    button.textContent = label;
    button.addEventListener("click", () => act(button));
    return button;
  }

  /** A message row's text as it is now, with "(edited)" after it if it was edited. */
  function showText(row, m) {
    const text = row.querySelector(".text");
    text.replaceChildren();
    appendText(text, String(m.text ?? ""));
    row.querySelector(".edited")?.remove();
    if (typeof m.edited !== "number") return;
    const mark = document.createElement("span");
    mark.className = "edited";
    mark.textContent = "(edited)";
    const [, full] = formatTime(m.edited);
    if (full) mark.title = `Edited ${full}`;
    text.after(mark);
  }

  /** A message row as a deleted one: in place, sender and time kept, the text gone. */
  function showDeleted(row) {
    const hadFocus = row.contains(document.activeElement);
    row.classList.add("deleted");
    row.classList.remove("editing");
    row.querySelector(".text").replaceChildren("message deleted");
    for (const gone of row.querySelectorAll(".edited, .editor, .actions")) gone.remove();
    // Its controls or its editor went with the text: keep the keyboard in the chat.
    if (hadFocus) ui.text.focus();
  }

  const GROUP_MS = 5 * 60 * 1000;

  /** A message directly after one of the same author (within minutes) shows no header. */
  function markContinued(room, index) {
    const m = room.messages[index];
    if (!m) return;
    const node = room.nodes.get(m.seq);
    if (!node) return;
    const prev = room.messages[index - 1];
    const continued = Boolean(
      prev &&
        prev.seq === m.seq - 1 &&
        prev.user &&
        m.user &&
        prev.user.id === m.user.id &&
        Math.abs(Number(m.ts) - Number(prev.ts)) < GROUP_MS,
    );
    node.classList.toggle("continued", continued);
  }

  function nodeFor(room, m) {
    let node = room.nodes.get(m.seq);
    if (!node) {
      node = messageNode(m);
      room.nodes.set(m.seq, node);
    }
    return node;
  }

  function edgeNode() {
    let edge = ui.messages.querySelector(".history-edge");
    if (!edge) {
      edge = document.createElement("div");
      edge.className = "history-edge";
    }
    return edge;
  }

  function renderEdge() {
    const room = activeRoom();
    const edge = ui.messages.querySelector(".history-edge");
    if (!room || !edge) return;
    if (room.loadingOlder) edge.textContent = "Loading older messages…";
    else if (room.hasMore) edge.textContent = "Scroll up for older messages";
    else if (room.loaded && room.messages.length === 0) edge.textContent = `No messages in ${room.name} yet. Say hello!`;
    else if (room.loaded) edge.textContent = `This is the beginning of ${room.name}.`;
    else edge.textContent = "Loading…";
  }

  function renderMessages() {
    const room = activeRoom();
    const pane = ui.messages;
    if (!room) {
      const empty = document.createElement("div");
      empty.className = "placeholder";
      const line = document.createElement("p");
      if (refusal) line.textContent = refusal;
      else if (socket) line.textContent = "Create or join a room to start chatting.";
      else line.textContent = "Pick a nickname and connect to start chatting.";
      empty.append(line);
      if (socket && !refusal) {
        const open = document.createElement("button");
        open.type = "button";
        open.className = "button narrow-only";
        open.textContent = "Choose a room";
        open.addEventListener("click", () => toggleDrawer("rooms"));
        empty.append(open);
      }
      pane.replaceChildren(empty);
      ui.jump.classList.add("hidden");
      return;
    }
    room.nodes = new Map(); // re-render: ownership (mine) or moderation may have changed
    const nodes = room.messages.map((m) => nodeFor(room, m));
    pane.replaceChildren(edgeNode(), ...nodes);
    room.messages.forEach((_, index) => markContinued(room, index));
    renderEdge();
    if (room.atBottom) scrollToBottom();
    else pane.scrollTop = room.scrollTop;
    ui.jump.classList.add("hidden");
  }

  function isNearBottom() {
    const pane = ui.messages;
    return pane.scrollHeight - pane.scrollTop - pane.clientHeight < NEAR_BOTTOM_PX;
  }

  function scrollToBottom() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
    ui.jump.classList.add("hidden");
    const room = activeRoom();
    if (room) room.atBottom = true;
  }

  function insertRendered(room, added, live) {
    const pane = ui.messages;
    const wasAtBottom = isNearBottom();
    const prevHeight = pane.scrollHeight;
    const prevTop = pane.scrollTop;
    const firstShown = pane.querySelector(".message");
    const firstSeq = firstShown ? Number(firstShown.dataset.seq) : Infinity;
    let prepended = false;
    let appendedOther = false;
    // Highest seq first: the following message's node then always exists already.
    const descending = [...added].sort((a, b) => b.seq - a.seq);
    for (const m of descending) {
      const index = lowerBound(room.messages, m.seq);
      const next = room.messages[index + 1];
      const nextNode = next ? room.nodes.get(next.seq) : null;
      pane.insertBefore(nodeFor(room, m), nextNode && nextNode.parentNode === pane ? nextNode : null);
      if (m.seq < firstSeq) prepended = true;
      else if (!isMine(m)) appendedOther = true;
    }
    for (const m of added) {
      const index = lowerBound(room.messages, m.seq);
      markContinued(room, index);
      markContinued(room, index + 1);
    }
    if (pane.querySelector(".history-edge") === null) pane.prepend(edgeNode());
    renderEdge();
    if (wasAtBottom) {
      scrollToBottom();
    } else if (prepended) {
      pane.scrollTop = prevTop + (pane.scrollHeight - prevHeight);
    } else if (live && appendedOther) {
      ui.jump.classList.remove("hidden");
    }
  }

  function renderJoined() {
    const items = order.map((id) => {
      const room = rooms.get(id);
      const li = document.createElement("li");
      li.className = "joined-room";
      li.dataset.roomId = String(room.id);
      li.dataset.roomName = room.name;
      const active = room.id === activeId;
      if (active) li.classList.add("active");
      if (room.error) li.classList.add("error");

      const tab = document.createElement("button");
      tab.type = "button";
      tab.className = "tab";
      tab.setAttribute("role", "tab");
      tab.setAttribute("aria-selected", String(active));
      const name = document.createElement("span");
      name.className = "room-name";
      name.textContent = room.name;
      tab.append(name);
      if (room.unread > 0 && !active) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = room.unread > 99 ? "99+" : String(room.unread);
        tab.append(badge);
      }
      tab.addEventListener("click", () => {
        setActive(room.id);
        closeDrawers();
      });

      const leave = document.createElement("button");
      leave.type = "button";
      leave.className = "leave";
      leave.title = `Leave ${room.name}`;
      leave.setAttribute("aria-label", `Leave ${room.name}`);
      leave.textContent = "×";
      leave.addEventListener("click", () => leaveRoom(room.id));

      li.append(tab, leave);
      return li;
    });
    ui.joined.replaceChildren(...items);
    ui.joinedEmpty.hidden = items.length > 0;
    const unread = [...rooms.values()].reduce((n, r) => n + r.unread, 0);
    document.title = unread > 0 ? `(${unread}) roomcast` : "roomcast";
    renderRooms();
  }

  /** Members of a room as the page knows them: its own count for a joined room (kept by
   *  presence events, so a busy room costs the server no request), else the server's. */
  const memberCount = (info) => (rooms.has(info.id) ? rooms.get(info.id).members.size : info.members || 0);

  function renderRooms() {
    const list = [...lastRoomList].map((info) => ({ ...info, members: memberCount(info) })).sort(
      (a, b) => (b.members || 0) - (a.members || 0) || String(a.name).localeCompare(String(b.name)),
    );
    if (list.length === 0) {
      const li = document.createElement("li");
      li.className = "hint";
      li.textContent = socket && socket.connected ? "No one is in a room: join or create one above." : "Not connected.";
      ui.rooms.replaceChildren(li);
      return;
    }
    const items = list.map((info) => {
      const li = document.createElement("li");
      li.className = "room";
      li.dataset.roomId = String(info.id);
      li.dataset.roomName = String(info.name);
      li.dataset.members = String(info.members ?? 0);
      if (rooms.has(info.id)) li.classList.add("joined");
      if (info.id === activeId) li.classList.add("active");

      const button = document.createElement("button");
      button.type = "button";
      const name = document.createElement("span");
      name.className = "room-name";
      name.textContent = String(info.name);
      const count = document.createElement("span");
      count.className = "count";
      count.textContent = String(info.members ?? 0);
      count.title = `${info.members ?? 0} online`;
      button.append(name, count);
      button.addEventListener("click", () => {
        joinRoom(String(info.name)).catch((err) => showNotice(`Could not join: ${err.message}`));
        closeDrawers();
      });
      li.append(button);
      return li;
    });
    ui.rooms.replaceChildren(...items);
  }

  function renderMembers() {
    const room = activeRoom();
    if (!room) {
      ui.members.replaceChildren();
      ui.memberCount.textContent = "0";
      return;
    }
    const list = [...room.members.values()].sort((a, b) =>
      String(a.name).localeCompare(String(b.name)),
    );
    const items = list.map((user) => {
      const li = document.createElement("li");
      li.className = "member";
      li.dataset.userId = String(user.id);
      if (me && user.id === me.id) li.classList.add("me");
      const dot = document.createElement("span");
      dot.className = "dot";
      dot.style.backgroundColor = colorFor(user.id);
      const name = document.createElement("span");
      name.className = "member-name";
      name.textContent = String(user.name);
      li.append(dot, name);
      return li;
    });
    ui.members.replaceChildren(...items);
    ui.memberCount.textContent = String(list.length);
  }

  function renderTyping() {
    const room = activeRoom();
    const names = room ? [...room.typing.values()].map((t) => t.name) : [];
    let text = "";
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = "Several people are typing…";
    ui.typing.textContent = text;
  }

  function updateComposer() {
    const room = activeRoom();
    const enabled = Boolean(room);
    ui.text.disabled = !enabled;
    ui.send.disabled = !enabled || ui.status.dataset.state !== "connected";
    ui.text.placeholder = room ? `Message ${room.name}` : "Join a room to chat";
  }

  function setActive(id) {
    const previous = activeRoom();
    if (previous) {
      previous.atBottom = isNearBottom();
      previous.scrollTop = ui.messages.scrollTop;
    }
    activeId = id;
    const room = activeRoom();
    if (room) room.unread = 0;
    ui.roomTitle.textContent = room ? room.name : "No room selected";
    renderMessages();
    renderMembers();
    renderTyping();
    renderJoined();
    updateComposer();
    rememberRooms();
    if (room) {
      fillViewport(room);
      ui.text.focus();
    }
  }

  function autoGrow() {
    ui.text.style.height = "auto";
    ui.text.style.height = `${Math.min(ui.text.scrollHeight, 160)}px`;
  }

  // ---------------------------------------------------------------- drawers (narrow screens)

  function closeDrawers() {
    ui.app.classList.remove("show-rooms", "show-members");
    ui.toggleRooms.setAttribute("aria-expanded", "false");
    ui.toggleMembers.setAttribute("aria-expanded", "false");
    ui.backdrop.hidden = true;
  }

  function toggleDrawer(which) {
    const cls = which === "rooms" ? "show-rooms" : "show-members";
    const open = !ui.app.classList.contains(cls);
    closeDrawers();
    if (open) {
      ui.app.classList.add(cls);
      (which === "rooms" ? ui.toggleRooms : ui.toggleMembers).setAttribute("aria-expanded", "true");
      ui.backdrop.hidden = false;
    }
  }

  // ---------------------------------------------------------------- wiring

  ui.loginForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = ui.nickname.value.trim();
    if (!name) {
      ui.nickname.focus();
      return;
    }
    store.set(STORE_NAME, name);
    connect(name);
    if (activeRoom()) ui.text.focus();
    else ui.roomName.focus();
  });

  ui.joinForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = ui.roomName.value.trim();
    if (!validRoomName(name)) {
      showNotice(`A room name is 1 to ${MAX_ROOM_NAME} printable characters.`);
      return;
    }
    if (!socket) {
      showNotice("Pick a nickname and connect first.");
      ui.nickname.focus();
      return;
    }
    // Disabled only until the join is answered: while the room's history loads, the next
    // name can be typed and submitted (Enter does nothing while the button is disabled).
    ui.join.disabled = true;
    try {
      await joinRoom(name, { waitHistory: false });
      if (ui.roomName.value.trim() === name) ui.roomName.value = ""; // not what was typed since
      closeDrawers();
    } catch (err) {
      showNotice(`Could not join ${name}: ${err.message}`);
    } finally {
      ui.join.disabled = false;
    }
  });

  ui.nickname.addEventListener("input", updateConnectButton);

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });

  ui.text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      sendMessage();
    }
  });

  ui.text.addEventListener("input", () => {
    autoGrow();
    sendTyping();
  });

  ui.messages.addEventListener("scroll", () => {
    const room = activeRoom();
    if (!room) return;
    room.atBottom = isNearBottom();
    if (room.atBottom) ui.jump.classList.add("hidden");
    if (ui.messages.scrollTop < NEAR_TOP_PX) loadOlder(room);
  });

  ui.jump.addEventListener("click", () => {
    scrollToBottom();
    ui.text.focus();
  });

  ui.refreshRooms.addEventListener("click", () => refreshRooms());
  ui.toggleRooms.addEventListener("click", () => toggleDrawer("rooms"));
  ui.toggleMembers.addEventListener("click", () => toggleDrawer("members"));
  ui.backdrop.addEventListener("click", closeDrawers);
  ui.notice.addEventListener("click", () => ui.notice.classList.add("hidden"));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeDrawers();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshRooms();
  });

  // ---------------------------------------------------------------- start

  renderMessages();
  renderJoined();
  updateComposer();
  updateConnectButton();
  const remembered = store.get(STORE_NAME, "");
  if (token) {
    // Signed in by the token: no nickname to ask for; the welcome says the name.
    ui.loginForm.classList.add("hidden");
    ui.whoami.classList.remove("hidden");
    connect("");
  } else if (typeof remembered === "string" && remembered.trim()) {
    ui.nickname.value = remembered;
    connect(remembered.trim());
  } else {
    ui.nickname.focus();
  }
})();
