//! Logic: goim's HTTP push API and `goim.logic.Logic` gRPC, routing in Redis,
//! push records to Kafka.
//!
//! Not built yet: lands with the logic/job issue.
