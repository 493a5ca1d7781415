//! The container's seccomp filter on the processes exec'd into it, as runc applies it.
//!
//! libcontainer builds an exec'd ("tenant") process from the container's spec but keeps only
//! its namespaces, cgroup and personality of `linux`: the seccomp filter is dropped, so a shell
//! exec'd into a container (`kubectl exec`, probes) would run unfiltered. The helper therefore
//! gives libcontainer an executor that installs the container's filter in the new process just
//! before it execs the command, the last code of ours it runs.
//!
//! Installing a filter needs `no_new_privs` or CAP_SYS_ADMIN. With `no_new_privs` the filter is
//! installed after the capabilities are final (runc's order too). Without it, the process is
//! given CAP_SYS_ADMIN in its effective and permitted sets only (never in its bounding,
//! inheritable or ambient sets, so nothing it execs can keep it), installs the filter, then drops
//! CAP_SYS_ADMIN unless the process was meant to have it: as in runc, the filter is then in force
//! for those last capability calls.

use std::collections::HashMap;

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError};
use oci_spec::runtime::{Capabilities, Capability, LinuxSeccomp, Process, Spec};

/// Runs the process's command once the container's seccomp filter is installed.
#[derive(Debug, Clone)]
pub struct SeccompExecutor {
    filter: LinuxSeccomp,
    /// CAP_SYS_ADMIN was lent for the installation and goes afterwards.
    return_sys_admin: bool,
}

impl SeccompExecutor {
    /// The executor for `process` in a container whose filter is `filter`, and the process as
    /// libcontainer must set it up (CAP_SYS_ADMIN lent where the installation needs it).
    pub fn plan(filter: LinuxSeccomp, mut process: Process) -> (SeccompExecutor, Process) {
        let no_new_privileges = process.no_new_privileges().unwrap_or(false);
        let mut caps = process.capabilities().clone().unwrap_or_default();
        let has_admin =
            |set: &Option<Capabilities>| set.as_ref().is_some_and(|s| s.contains(&Capability::SysAdmin));
        let meant_to_have_it = has_admin(caps.effective()) && has_admin(caps.permitted());
        let lend = !no_new_privileges && !meant_to_have_it;
        if lend {
            let with_admin = |set: &Option<Capabilities>| {
                let mut set = set.clone().unwrap_or_default();
                set.insert(Capability::SysAdmin);
                Some(set)
            };
            let (effective, permitted) = (with_admin(caps.effective()), with_admin(caps.permitted()));
            caps.set_effective(effective).set_permitted(permitted);
            process.set_capabilities(Some(caps));
        }
        (SeccompExecutor { filter, return_sys_admin: lend }, process)
    }

    fn install(&self) -> Result<(), ExecutorError> {
        if libcontainer::seccomp::is_notify(&self.filter) {
            return Err(ExecutorError::Other(
                "the container's seccomp profile uses SCMP_ACT_NOTIFY, which an exec'd process cannot have"
                    .into(),
            ));
        }
        libcontainer::seccomp::initialize_seccomp(&self.filter)
            .map_err(|e| ExecutorError::Other(format!("installing the container's seccomp filter: {e}")))?;
        if self.return_sys_admin {
            for set in [caps::CapSet::Effective, caps::CapSet::Permitted] {
                caps::drop(None, set, caps::Capability::CAP_SYS_ADMIN).map_err(|e| {
                    ExecutorError::Other(format!("dropping CAP_SYS_ADMIN after seccomp: {e}"))
                })?;
            }
        }
        Ok(())
    }
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        self.install()?;
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        DefaultExecutor {}.setup_envs(envs)
    }
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{LinuxCapabilities, ProcessBuilder};

    use super::*;

    fn process(no_new_privileges: bool, caps: &[Capability]) -> Process {
        let set: Capabilities = caps.iter().copied().collect();
        let mut capabilities = LinuxCapabilities::default();
        capabilities
            .set_bounding(Some(set.clone()))
            .set_effective(Some(set.clone()))
            .set_permitted(Some(set))
            .set_inheritable(None)
            .set_ambient(None);
        ProcessBuilder::default()
            .no_new_privileges(no_new_privileges)
            .capabilities(capabilities)
            .build()
            .unwrap()
    }

    fn sets(process: &Process) -> [Capabilities; 3] {
        let caps = process.capabilities().clone().unwrap();
        [caps.bounding(), caps.effective(), caps.permitted()].map(|s| s.clone().unwrap_or_default())
    }

    #[test]
    fn cap_sys_admin_is_lent_for_the_filter_only_where_it_is_needed_and_never_to_the_bounding_set() {
        let (executor, lent) =
            SeccompExecutor::plan(LinuxSeccomp::default(), process(false, &[Capability::Chown]));
        assert!(executor.return_sys_admin);
        let [bounding, effective, permitted] = sets(&lent);
        assert!(!bounding.contains(&Capability::SysAdmin), "nothing exec'd can keep it");
        assert!(effective.contains(&Capability::SysAdmin) && permitted.contains(&Capability::SysAdmin));
        assert!(effective.contains(&Capability::Chown), "the process's own capabilities stay");

        let (executor, kept) =
            SeccompExecutor::plan(LinuxSeccomp::default(), process(true, &[Capability::Chown]));
        assert!(!executor.return_sys_admin, "no_new_privs: the filter needs no capability");
        assert_eq!(sets(&kept), sets(&process(true, &[Capability::Chown])));

        let admin = process(false, &[Capability::SysAdmin]);
        let (executor, kept) = SeccompExecutor::plan(LinuxSeccomp::default(), admin.clone());
        assert!(!executor.return_sys_admin, "a process meant to have CAP_SYS_ADMIN keeps it");
        assert_eq!(sets(&kept), sets(&admin));
    }
}
