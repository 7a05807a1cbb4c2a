// Tetherlab plugin for OpenCode: every tool call asks the local `tether run` process first.
// tetherlab-plugin: managed by `tether install opencode` (edits are overwritten; `tether uninstall opencode` removes it)
//
// Contract (same as `tether hook`): one JSON line to the unix socket at $TETHER_SOCK,
// one JSON line back: {"decision": "allow"|"deny"|"stop", "reason": str, "context": str}.
// Fail closed: a deny, a stop, a missing socket, a late or malformed reply all throw,
// and a throw in "tool.execute.before" blocks the tool call.
//
// OpenCode calls EVERY export of a plugin file as a plugin, so this file exports only the
// plugin itself (named and default); the guard below keeps a double registration harmless.
import net from "node:net";

const SOCK_ENV = "TETHER_SOCK";
const BUDGET_ENV = "TETHER_HOOK_BUDGET_S";
const DEFAULT_BUDGET_MS = 3000;
const MAX_BUDGET_MS = 25000;
const MAX_REPLY_BYTES = 4 * 1024 * 1024;
const DECISIONS = new Set(["allow", "deny", "stop"]);
const UNREACHABLE_FIX =
  "Run the agent under `tether run -- opencode` so it is coordinated, or remove the plugin with `tether uninstall opencode`.";

function budgetMs() {
  const raw = Number(process.env[BUDGET_ENV]);
  return Number.isFinite(raw) && raw > 0 ? Math.min(raw * 1000, MAX_BUDGET_MS) : DEFAULT_BUDGET_MS;
}

function str(value) {
  return typeof value === "string" ? value : null;
}

function parseReply(line) {
  let obj;
  try {
    obj = JSON.parse(line);
  } catch (e) {
    throw new Error(`malformed reply from the tether shim: ${e.message}`);
  }
  if (!obj || typeof obj !== "object" || Array.isArray(obj) || !DECISIONS.has(obj.decision)) {
    throw new Error("malformed reply from the tether shim");
  }
  const reason = obj.reason == null ? "" : obj.reason;
  const context = obj.context == null ? "" : obj.context;
  if (typeof reason !== "string" || typeof context !== "string") {
    throw new Error("malformed reply from the tether shim: reason/context not strings");
  }
  return { decision: obj.decision, reason, context };
}

// One request line out, one reply line back, bounded by our own timer.
function askTether(request, timeoutMs) {
  return new Promise((resolve, reject) => {
    const path = process.env[SOCK_ENV];
    if (!path) {
      reject(new Error(`${SOCK_ENV} is not set (the agent is not running under \`tether run\`)`));
      return;
    }
    const chunks = [];
    let size = 0;
    let done = false;
    const sock = net.createConnection({ path });
    const finish = (err, value) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(value);
    };
    const timer = setTimeout(() => finish(new Error("no reply from the tether shim in time")), timeoutMs);
    sock.on("connect", () => sock.write(JSON.stringify(request) + "\n"));
    sock.on("data", (chunk) => {
      chunks.push(chunk);
      size += chunk.length;
      const all = Buffer.concat(chunks);
      const nl = all.indexOf(10);
      if (nl >= 0) {
        try {
          finish(null, parseReply(all.subarray(0, nl).toString("utf8")));
        } catch (e) {
          finish(e);
        }
      } else if (size > MAX_REPLY_BYTES) {
        finish(new Error("reply from the tether shim is too large"));
      }
    });
    sock.on("error", (e) => finish(new Error(`cannot reach the tether shim at ${path}: ${e.message}`)));
    sock.on("close", () => finish(new Error("the tether shim closed the connection without a reply")));
  });
}

function request(cwd, event, sessionID, tool, args) {
  // budget_s: how long tether may wait (for a plan's verdict) before answering this call.
  return {
    v: 1,
    op: "hook",
    agent: "opencode",
    event,
    session_id: str(sessionID),
    cwd,
    tool_name: str(tool),
    tool_input: args && typeof args === "object" && !Array.isArray(args) ? args : null,
    prompt: null,
    budget_s: Math.max(0, budgetMs() - 200) / 1000,
  };
}

// tether's reasons start with "Tetherlab" already; say it once.
function prefixed(reason) {
  return /^Tetherlab\b/.test(reason) ? reason : `Tetherlab: ${reason}`;
}

function appendSystem(output, text) {
  if (!output || typeof output !== "object") return;
  if (Array.isArray(output.system)) output.system.push(text);
  else if (typeof output.system === "string") output.system = output.system ? `${output.system}\n\n${text}` : text;
  else output.system = [text];
}

// OpenCode may hand the same context to both exports; only the first registration gets hooks.
const registered = new WeakSet();

export const TetherlabPlugin = async (ctx) => {
  if (ctx && typeof ctx === "object") {
    if (registered.has(ctx)) return {};
    registered.add(ctx);
  }
  const cwd = str(ctx && ctx.directory) || str(ctx && ctx.worktree) || process.cwd();
  return {
    "tool.execute.before": async (input, output) => {
      const req = request(cwd, "PreToolUse", input && input.sessionID, input && input.tool, output && output.args);
      let reply;
      try {
        reply = await askTether(req, budgetMs());
      } catch (e) {
        throw new Error(`Tetherlab: the tether shim is unreachable (${e.message}); this tool call is blocked. ${UNREACHABLE_FIX}`);
      }
      if (reply.decision === "stop") throw new Error(prefixed(reply.reason || "stopped by Tetherlab"));
      if (reply.decision !== "allow") throw new Error(prefixed(reply.reason || "denied by Tetherlab"));
    },
    // After a tool ran: tether reports the working state (soft conflicts, drift). Best effort,
    // it cannot undo the call; news from the master goes into the tool's output the model reads.
    "tool.execute.after": async (input, output) => {
      const req = request(cwd, "PostToolUse", input && input.sessionID, input && input.tool, null);
      let reply;
      try {
        reply = await askTether(req, Math.min(budgetMs(), DEFAULT_BUDGET_MS));
      } catch (e) {
        return;
      }
      if (reply.decision === "stop") throw new Error(prefixed(reply.reason || "stopped by Tetherlab"));
      if (reply.context && output && typeof output === "object" && typeof output.output === "string") {
        output.output = `${output.output}\n\n${prefixed(reply.context)}`;
      }
    },
    "experimental.chat.system.transform": async (input, output) => {
      const req = request(cwd, "SessionStart", input && input.sessionID, null, null);
      let text;
      try {
        const reply = await askTether(req, budgetMs());
        if (reply.decision === "allow") text = reply.context;
        else text = `Tetherlab (${reply.decision}): ${reply.reason}${reply.context ? `\n\n${reply.context}` : ""}`;
      } catch (e) {
        // Context is advisory; tool calls are what get blocked, so warn instead of failing the chat.
        text =
          `WARNING from Tetherlab: the tether shim is unreachable (${e.message}). You are not coordinated with ` +
          `other agents; edits and shell commands will be blocked until the shim answers. ${UNREACHABLE_FIX}`;
      }
      if (text) appendSystem(output, text);
    },
  };
};

export default TetherlabPlugin;
