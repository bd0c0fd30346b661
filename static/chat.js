// 第 6 课聊天页：纯 JavaScript，没有框架、没有构建步骤、不连外网。
// 三件事：从 /v1/models 列出模型；用 fetch 读 /v1/chat/completions 的 SSE 流，一块一块显示；
// 对话存在服务器的会话里（session_id），刷新页面后用 GET /v1/sessions/{id} 取回来。
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "llm-course-api-key";     // API key 只放在这个标签页的 sessionStorage（关掉标签页就没了）
const SESSION_STORE = "llm-course-session"; // 会话号放在 localStorage：刷新、重开页面都还在
let controller = null;                      // 正在进行的请求的 AbortController（“停止”按钮用它）

// ---------------------------------------------------------------- 小工具
function newSessionId() {
  // crypto.randomUUID 只在 https 或 localhost 下可用；局域网 http 访问时退回 getRandomValues
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

// 把 HTTP 错误翻译成一句人话。401 / 429 / 503 是服务器最常见的三种拒绝。
async function explain(res) {
  let detail = "";
  try { detail = (await res.json()).error.message; } catch (e) { /* 不是 JSON：只报状态码 */ }
  if (res.status === 401) {
    $("key-row").hidden = false;
    return "401：服务器需要 API key，或者你填的 key 不对。请在上方“API key”里填写正确的 key。";
  }
  if (res.status === 429) {
    const wait = res.headers.get("Retry-After") || "几";
    return `429：请求太频繁，被限流了，请 ${wait} 秒后再试。（${detail}）`;
  }
  if (res.status === 503) return `503：服务器暂时不能处理（模型还在加载，或者队列满了），请稍后再试。（${detail}）`;
  return `${res.status}：${detail || res.statusText}`;
}

// 显示一条消息。模型的输出一律当纯文本：只用 textContent，从不用 innerHTML，
// 所以回答里就算有 <script> 或 <img onerror=...>，也只会原样显示成文字。
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setStats(div, text) {
  const s = document.createElement("small");
  s.className = "stats";
  s.textContent = text;
  div.appendChild(s);
}

// ---------------------------------------------------------------- 模型列表与会话
async function loadModels() {
  const res = await fetch("/v1/models", { headers: headers() });
  if (!res.ok) { notice(await explain(res)); return false; }
  const select = $("model");
  select.replaceChildren();
  for (const m of (await res.json()).data) {
    if (m.id.startsWith("text-embedding")) continue;   // 句向量模型不能聊天
    select.appendChild(new Option(m.id, m.id));
  }
  return true;
}

async function restoreSession() {
  const id = localStorage.getItem(SESSION_STORE);
  if (!id) { startNewChat(); return; }
  $("session-id").textContent = id;
  const res = await fetch("/v1/sessions/" + encodeURIComponent(id), { headers: headers() });
  if (res.status === 404) return;                      // 还没有完整的一轮对话：服务器上没有这个会话
  if (!res.ok) { notice(await explain(res)); return; }
  for (const m of (await res.json()).messages) addMessage(m.role, m.content);
}

function startNewChat() {
  const id = newSessionId();
  localStorage.setItem(SESSION_STORE, id);
  $("session-id").textContent = id;
  $("messages").replaceChildren();
  notice("");
}

// ---------------------------------------------------------------- 读 SSE 流
// 服务器发来的是一行行 "data: {...json...}"，事件之间用空行（\n\n）隔开，最后是 "data: [DONE]"。
// 网络把字节切成几块交给我们，边界可能落在一行中间：所以先攒进 buffer，只处理完整的事件，剩下的留到下一块。
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();          // stream: true 时，被切开的多字节汉字会等下一块补齐再解码
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;       // SSE 的注释行、空行：跳过
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ---------------------------------------------------------------- 发送一条消息
async function send(text) {
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  const span = div.querySelector(".text");
  controller = new AbortController();
  setBusy(true);
  notice("");
  const body = {
    model: $("model").value,
    messages: [{ role: "user", content: text }],   // 只发新消息：历史由服务器按 session_id 补上
    session_id: localStorage.getItem(SESSION_STORE),
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },       // 最后一块带上 usage：准确的 token 数
  };
  const t0 = performance.now();
  let tFirst = null, pieces = 0, usage = null, status = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!res.ok) { div.remove(); notice(await explain(res)); return; }
    for await (const chunk of sseEvents(res.body)) {
      if (chunk.error) { status = "出错：" + chunk.error.message; break; }   // 流中途出错（如服务器关闭）
      if (chunk.usage) usage = chunk.usage;
      const piece = chunk.choices?.[0]?.delta?.content;
      if (!piece) continue;
      if (tFirst === null) tFirst = performance.now();
      pieces += 1;
      span.textContent += piece;                    // 追加纯文本：从不解析成 HTML
      div.scrollIntoView({ block: "end" });
    }
  } catch (e) {
    if (e.name !== "AbortError") { notice("连接出错：" + e.message); status = "连接出错"; }
    else status = "已停止（这一轮不会存进会话）";
  } finally {
    div.classList.remove("streaming");
    controller = null;
    setBusy(false);
  }
  // 首 token 延迟（TTFT）= 发出请求到第一块文字；速度 = 第一块之后每秒多少个 token
  const tEnd = performance.now();
  const tokens = usage ? usage.completion_tokens : pieces;
  const parts = [];
  if (tFirst !== null) {
    parts.push(`首 token ${((tFirst - t0) / 1000).toFixed(2)} 秒`);
    if (tokens > 1 && tEnd > tFirst) parts.push(`${((tokens - 1) / ((tEnd - tFirst) / 1000)).toFixed(1)} token/秒`);
    parts.push(`${tokens} 个 token`);
  }
  if (status) parts.push(status);
  setStats(div, parts.join(" · ") || "没有生成任何文字");
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// ---------------------------------------------------------------- 事件绑定与启动
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {   // isComposing：中文输入法选字时的回车不算发送
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
// 停止：中止 fetch，浏览器关闭连接；服务器发现客户端断开，就把这个序列移出批次、释放槽位
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", startNewChat);
$("api-key").addEventListener("change", async () => {
  sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
  notice("");
  if (await loadModels()) { $("messages").replaceChildren(); await restoreSession(); }
});

async function start() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  if ($("api-key").value) $("key-row").hidden = false;
  if (await loadModels()) await restoreSession();
  else $("session-id").textContent = localStorage.getItem(SESSION_STORE) || "";
}
start();
