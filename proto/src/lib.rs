//! Generated gRPC and message types (filled in by issue C).
