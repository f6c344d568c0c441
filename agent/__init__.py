"""Device side: verify a bundle, pick a runtime, serve KServe v2 gRPC, report telemetry."""
