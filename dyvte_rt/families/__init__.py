"""Model families on the runtime side, one module each, chosen by the manifest's family."""
