// A non-Python backend on the gateway: Node's built-in fetch submits a job, polls it and reads its result.
// Usage: GATEWAY_URL=http://127.0.0.1:8000 API_KEY=... node node_client.mjs DEPLOYMENT '<JSON inputs>'
// Prints {"id", "states", "result"} as JSON; exits 1 on any HTTP error.

const base = process.env.GATEWAY_URL;
const headers = { "Authorization": `Bearer ${process.env.API_KEY}`, "Content-Type": "application/json" };
const [deployment, inputsJson] = process.argv.slice(2);

async function call(method, path, body) {
  const response = await fetch(`${base}${path}`, { method, headers, body: body && JSON.stringify(body) });
  const payload = await response.json();
  if (response.status >= 400) {
    throw new Error(`${method} ${path}: ${response.status} ${JSON.stringify(payload)}`);
  }
  return { status: response.status, payload };
}

const created = await call("POST", "/v1/jobs", { deployment, inputs: JSON.parse(inputsJson) });
if (created.status !== 202) throw new Error(`submit answered ${created.status}`);
const id = created.payload.id;
const states = [];
for (let attempt = 0; attempt < 1200; attempt++) {
  const { payload } = await call("GET", `/v1/jobs/${id}`);
  states.push(payload.state);
  if (["SUCCESS", "FAILURE", "CANCELLED"].includes(payload.state)) break;
  await new Promise((resolve) => setTimeout(resolve, 100));
}
const { status, payload } = await call("GET", `/v1/jobs/${id}/result?wait=30`);
if (status !== 200) throw new Error(`result answered ${status}`);
console.log(JSON.stringify({ id, states, result: payload.result }));
