// An independent OPC UA server (node-opcua) for edge-agent's interoperability test.
// Usage: node server.js PORT   — prints "READY <certificate file>" once listening.
// Its PKI goes under $HOME: the test gives it a temporary HOME.
"use strict";
const { OPCUAServer, Variant, DataType, StatusCodes, OPCUACertificateManager } = require("node-opcua");
const path = require("path");
const os = require("os");

async function main() {
  const port = parseInt(process.argv[2], 10);
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
  setInterval(() => {
    speed += 0.5;
    count += 1;
    countVar.setValueFromSource(new Variant({ dataType: DataType.Int32, value: count }), StatusCodes.Good, new Date());
    speedVar.touchValue();
  }, 100);
  await server.start();
  process.stdout.write(`READY ${server.certificateFile}\n`);
  const stop = async () => { await server.shutdown(0); process.exit(0); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => { console.error(err); process.exit(1); });
