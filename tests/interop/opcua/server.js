// An independent OPC UA server (node-opcua) for edge-agent's interoperability tests.
// Usage: node server.js PORT [MAX_SESSIONS]
// Prints `READY {"certificate": <file>, "namespace": <its own namespace URI>}` once listening.
// Its PKI goes under $HOME: the test gives it a temporary HOME.
// Frozen: a Double that goes up by 1 every 100 ms while its source timestamp never changes,
// as some PLC gateways and simulators do.
"use strict";
const { OPCUAServer, Variant, DataType, StatusCodes, OPCUACertificateManager } = require("node-opcua");
const path = require("path");
const os = require("os");

async function main() {
  const port = parseInt(process.argv[2], 10);
  const maxSessions = parseInt(process.argv[3] || "10", 10);
  const pkiRoot = path.join(os.homedir(), "pki");
  const serverCertificateManager = new OPCUACertificateManager({
    rootFolder: pkiRoot,
    automaticallyAcceptUnknownCertificate: true,
  });
  const server = new OPCUAServer({
    port,
    resourcePath: "/interop",
    serverCertificateManager,
    buildInfo: { productName: "edge-agent-interop" },
    serverCapabilities: { maxSessions },
  });
  await server.initialize();
  const ns = server.engine.addressSpace.getOwnNamespace();
  const plant = ns.addObject({ organizedBy: server.engine.addressSpace.rootFolder.objects, browseName: "Plant" });
  let speed = 1.0;
  let count = 0;
  const speedVar = ns.addVariable({ componentOf: plant, browseName: "Speed", nodeId: "s=Speed", dataType: "Double", minimumSamplingInterval: 100,
    value: { get: () => new Variant({ dataType: DataType.Double, value: speed }) } });
  const countVar = ns.addVariable({ componentOf: plant, browseName: "Count", nodeId: "s=Count", dataType: "Int32" });
  countVar.setValueFromSource(new Variant({ dataType: DataType.Int32, value: count }), StatusCodes.Good, new Date());
  ns.addVariable({ componentOf: plant, browseName: "Label", nodeId: "s=Label", dataType: "String",
    value: new Variant({ dataType: DataType.String, value: "interop" }) });
  const frozenAt = new Date();
  let frozen = 0;
  const frozenVar = ns.addVariable({ componentOf: plant, browseName: "Frozen", nodeId: "s=Frozen", dataType: "Double" });
  frozenVar.setValueFromSource(new Variant({ dataType: DataType.Double, value: frozen }), StatusCodes.Good, frozenAt);
  setInterval(() => {
    speed += 0.5;
    count += 1;
    frozen += 1;
    countVar.setValueFromSource(new Variant({ dataType: DataType.Int32, value: count }), StatusCodes.Good, new Date());
    frozenVar.setValueFromSource(new Variant({ dataType: DataType.Double, value: frozen }), StatusCodes.Good, frozenAt);
    speedVar.touchValue();
  }, 100);
  await server.start();
  const ready = { certificate: server.certificateFile, namespace: ns.namespaceUri };
  process.stdout.write(`READY ${JSON.stringify(ready)}\n`);
  const stop = async () => { await server.shutdown(0); process.exit(0); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => { console.error(err); process.exit(1); });
