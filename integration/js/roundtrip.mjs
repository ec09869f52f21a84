// MQTT.js, the client browsers use, against a roost WebSocket listener.
//
//   node roundtrip.mjs URL PROTOCOL_VERSION TOPIC_PREFIX [CA_FILE]
//
// Connects to URL (ws://host:port/mqtt or wss://...), subscribes to PREFIX/# at QoS 2,
// publishes QoS 0, 1 and 2 messages (and, on MQTT 5, a message with user properties and
// two on one topic through an automatically assigned topic alias), and waits for every one
// of them to come back with the same topic, payload and QoS. Exits 0 only when all arrived
// and the client disconnected cleanly; otherwise prints what is missing and exits 1.
// The last stdout line is a JSON summary that the pytest side reads.
import { readFileSync } from "node:fs";
import mqtt from "mqtt";

const [url, versionArg, prefix, caFile] = process.argv.slice(2);
if (!url || !versionArg || !prefix) {
  console.error("usage: node roundtrip.mjs URL PROTOCOL_VERSION TOPIC_PREFIX [CA_FILE]");
  process.exit(2);
}
const protocolVersion = Number(versionArg);
const v5 = protocolVersion === 5;
const DEADLINE_MS = 20000;

const big = Buffer.alloc(150 * 1024, "b"); // spans several WebSocket frames and TCP reads
const expected = [
  { topic: `${prefix}/qos0`, payload: Buffer.from("zero"), qos: 0 },
  { topic: `${prefix}/qos1`, payload: Buffer.from("one"), qos: 1 },
  { topic: `${prefix}/qos2`, payload: Buffer.from("two"), qos: 2 },
  { topic: `${prefix}/big`, payload: big, qos: 1 },
];
if (v5) {
  expected.push(
    { topic: `${prefix}/props`, payload: Buffer.from("with props"), qos: 1,
      userProperties: { origin: "mqtt.js", run: prefix } },
    // The second publish on this topic goes out with an empty topic and the alias only.
    { topic: `${prefix}/aliased`, payload: Buffer.from("alias first"), qos: 1 },
    { topic: `${prefix}/aliased`, payload: Buffer.from("alias second"), qos: 1 },
  );
}

const options = {
  protocolVersion,
  clientId: `mqttjs-${protocolVersion}-${process.pid}`,
  clean: true,
  reconnectPeriod: 0, // a failure must fail the run, not be retried
  connectTimeout: 10000,
};
if (protocolVersion === 3) options.protocolId = "MQIsdp";
if (v5) options.autoAssignTopicAlias = true;
if (caFile) {
  options.ca = readFileSync(caFile);
  options.rejectUnauthorized = true;
}

const summary = { url, protocolVersion, topicAliasesSent: 0, received: [], missing: [], errors: [] };
const timer = setTimeout(() => finish("timed out"), DEADLINE_MS);
let client;

function key(m) {
  return `${m.topic} ${m.payload.toString("latin1")}`;
}
const pending = new Map(expected.map((m) => [key(m), m]));
let allArrived;
const arrived = new Promise((resolve) => { allArrived = resolve; });

function onMessage(topic, payload, packet) {
  const want = pending.get(key({ topic, payload }));
  const got = { topic, qos: packet.qos, bytes: payload.length };
  summary.received.push(got);
  if (!want) {
    summary.errors.push(`unexpected message on ${topic} (${payload.length} bytes)`);
    return;
  }
  if (packet.qos !== want.qos) {
    summary.errors.push(`${topic}: QoS ${packet.qos}, published at ${want.qos}`);
  }
  if (want.userProperties) {
    const props = packet.properties?.userProperties ?? {};
    for (const [k, v] of Object.entries(want.userProperties)) {
      if (props[k] !== v) summary.errors.push(`${topic}: user property ${k}=${props[k]}, want ${v}`);
    }
  }
  pending.delete(key(want));
  if (pending.size === 0) allArrived();
}

async function finish(problem) {
  clearTimeout(timer);
  if (problem) summary.errors.push(problem);
  summary.missing = [...pending.values()].map((m) => `${m.topic} (QoS ${m.qos})`);
  if (client) {
    try {
      await client.endAsync();
    } catch (e) {
      summary.errors.push(`disconnect: ${e.message}`);
    }
  }
  const ok = summary.errors.length === 0 && summary.missing.length === 0;
  for (const e of summary.errors) console.error(`error: ${e}`);
  for (const m of summary.missing) console.error(`missing: ${m}`);
  console.log(JSON.stringify({ ok, ...summary }));
  process.exit(ok ? 0 : 1);
}

try {
  client = await mqtt.connectAsync(url, options);
  client.on("error", (e) => summary.errors.push(`client error: ${e.message}`));
  client.on("message", onMessage);
  const granted = await client.subscribeAsync(`${prefix}/#`, { qos: 2 });
  if (granted.length !== 1 || granted[0].qos !== 2) {
    throw new Error(`SUBACK granted ${JSON.stringify(granted)}, want QoS 2`);
  }
  for (const m of expected) {
    const opts = { qos: m.qos };
    if (m.userProperties) opts.properties = { userProperties: m.userProperties };
    // Resolves on PUBACK / PUBCOMP for QoS 1 / 2; a refusal (v5 reason >= 0x80) rejects.
    await client.publishAsync(m.topic, m.payload, opts);
  }
  // Aliases exist only if the broker's CONNACK offered some (Topic Alias Maximum > 0).
  summary.topicAliasesSent = client.topicAliasSend?.length ?? 0;
  await arrived;
  await finish(null);
} catch (e) {
  await finish(e?.message ?? String(e));
}
