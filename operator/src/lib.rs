//! Operator: reconciles `PushCluster` resources into comet, logic and job
//! deployments, scales comets by connections and drains them before removal.
//!
//! Not built yet: lands with the operator issue.
