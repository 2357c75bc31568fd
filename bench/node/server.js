// The Node Socket.IO v4 baseline: roomcast's chat protocol on a stock Socket.IO server.
//
//   node bench/node/server.js --port 8002 [--redis-url redis://127.0.0.1:6379/0 --key NAME]
//                             [--path /ws/socket.io]
//
// With --redis-url the processes share rooms through @socket.io/redis-adapter (the classic
// adapter: every message to every process). It speaks the subset of roomcast's protocol the
// benchmarks use: connect with auth {name} (welcome), `join {room}` and `send {room, text}`
// answered by acks, and the `message` event with roomcast's fields
// {room, seq, epoch, id, user, text, ts} to every member, the sender included. It stores
// nothing and orders nothing across processes (seq counts per process).
"use strict";

const http = require("node:http");
const crypto = require("node:crypto");
const zlib = require("node:zlib");
const { Server } = require("socket.io");

function parseArgs(argv) {
  const args = { host: "127.0.0.1", port: 0, path: "/ws/socket.io", redisUrl: "", key: "socket.io" };
  for (let i = 2; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, "").replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(name in args)) throw new Error(`unknown option ${argv[i]}`);
    args[name] = argv[i + 1];
  }
  args.port = Number(args.port);
  return args;
}

async function main() {
  const args = parseArgs(process.argv);
  const httpServer = http.createServer((req, res) => {
    res.writeHead(404);
    res.end();
  });
  const io = new Server(httpServer, { path: args.path, cors: { origin: "*" }, serveClient: false });
  const clients = [];
  if (args.redisUrl) {
    const { createClient } = require("redis");
    const { createAdapter } = require("@socket.io/redis-adapter");
    const pub = createClient({ url: args.redisUrl });
    const sub = pub.duplicate();
    await Promise.all([pub.connect(), sub.connect()]);
    clients.push(pub, sub);
    io.adapter(createAdapter(pub, sub, { key: args.key }));
  }

  const epoch = crypto.randomBytes(4).toString("hex");
  const seqs = new Map();
  let nextUser = 0;
  const roomId = (name) => zlib.crc32 ? zlib.crc32(name) & 0x7fffffff : hash(name);

  io.use((socket, next) => {
    const name = socket.handshake.auth && socket.handshake.auth.name;
    if (typeof name !== "string" || name.trim().length < 1 || name.trim().length > 32) {
      const err = new Error("invalid name");
      err.data = { code: "invalid_name", message: "invalid name" };
      return next(err);
    }
    socket.data.user = { id: ++nextUser, name: name.trim() };
    next();
  });

  io.on("connection", (socket) => {
    socket.emit("welcome", { user: socket.data.user });

    socket.on("join", (data, ack) => {
      const room = data && data.room;
      if (typeof ack !== "function") return;
      if (typeof room !== "string" || !room) {
        return ack({ ok: false, error: { code: "invalid_room", message: "bad room" } });
      }
      socket.join(room);
      const members = [];
      for (const id of io.of("/").adapter.rooms.get(room) || []) {
        const member = io.of("/").sockets.get(id);
        if (member) members.push(member.data.user);
      }
      ack({
        ok: true,
        room: { id: roomId(room), name: room },
        epoch,
        seq: seqs.get(room) || 0,
        members,
      });
    });

    socket.on("send", (data, ack) => {
      const room = data && data.room;
      const text = data && data.text;
      const reply = typeof ack === "function" ? ack : () => {};
      if (typeof room !== "string" || !socket.rooms.has(room)) {
        return reply({ ok: false, error: { code: "not_member", message: "join first" } });
      }
      if (typeof text !== "string" || text.length < 1 || text.length > 4000) {
        return reply({ ok: false, error: { code: "invalid_text", message: "bad text" } });
      }
      const seq = (seqs.get(room) || 0) + 1;
      seqs.set(room, seq);
      const message = {
        room: roomId(room),
        seq,
        epoch,
        id: crypto.randomBytes(8).toString("hex"),
        user: socket.data.user,
        text,
        ts: Date.now(),
      };
      io.to(room).emit("message", message);
      reply({ ok: true, message });
    });
  });

  const shutdown = async () => {
    io.close();
    await Promise.allSettled(clients.map((c) => c.quit()));
    process.exit(0);
  };
  process.on("SIGTERM", shutdown);
  process.on("SIGINT", shutdown);

  httpServer.listen(args.port, args.host, () => {
    console.log(`listening on ${args.host}:${httpServer.address().port}`);
  });
}

function hash(name) {
  let h = 0;
  for (const ch of name) h = (Math.imul(h, 31) + ch.codePointAt(0)) & 0x7fffffff;
  return h;
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
