//! S5 as a scenario of the run: hands the run's settings to [`crate::s5`],
//! which runs the distributed path, and records what it measured.

use super::Ctx;
use crate::Result;

pub(super) async fn s5(ctx: &mut Ctx) -> Result<()> {
    let Some(services) = ctx.services.clone() else {
        return Err(crate::s5::Error::NoServices.into());
    };
    let outcome = crate::s5::run(crate::s5::Setup {
        binary: &ctx.binary,
        core: ctx.server_core,
        out: &ctx.out,
        clock: ctx.clock,
        sweep: ctx.sweep,
        services: &services,
        plan: &ctx.plan.s5,
        perf: ctx.perf,
        grpc_flags: &ctx.grpc.flags,
    })
    .await?;
    ctx.report.targets.extend(outcome.targets);
    ctx.report.scenarios.insert("s5".to_owned(), outcome.record);
    Ok(())
}
