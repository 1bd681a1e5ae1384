//! End-to-end harness (see docs/TEAM-CONTRACT.md).
