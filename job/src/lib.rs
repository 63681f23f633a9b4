//! Job: consumes the Kafka push topic and calls comets, at least once.
//!
//! Not built yet: lands with the logic/job issue.
