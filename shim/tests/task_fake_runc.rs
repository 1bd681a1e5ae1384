//! `task_<verb>` logic against a fake `runc` (a shell script), without containerd.
//!
//! The test process makes itself a child subreaper and feeds containerd-shim's exit monitor
//! from its own `waitpid` loop, as the real shim's reaper does.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use containerd_shim::{
    api::{
        CheckpointTaskRequest, CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest,
        PauseRequest, ResumeRequest, StartRequest, StateRequest, WaitRequest,
    },
    protos::protobuf::{well_known_types::any::Any, Message, MessageDyn, MessageField},
    ExitSignal,
};
use containerd_shim_distriproc_v2::{
    error::ShimError, events::EventSink, lazy::EagerOnly, options::RUNC_OPTIONS, task::TaskService,
};

#[derive(Default)]
struct Captured(Mutex<Vec<String>>);
impl EventSink for Captured {
    fn publish(&self, topic: String, _event: Box<dyn MessageDyn>) {
        self.0.lock().unwrap().push(topic);
    }
}

/// A runc stand-in: `create` starts `sleep` and writes its pid, `kill` signals it, `restore`
/// fails the way runc does (message in the --log file, exit 1).
const FAKE_RUNC: &str = r#"#!/bin/sh
log=""; pidfile=""; verb=""
while [ $# -gt 0 ]; do
  case "$1" in
    --log) log="$2"; shift 2;;
    --root|--log-format) shift 2;;
    --pid-file) pidfile="$2"; shift 2;;
    --work-path) work="$2"; shift 2;;
    --process) shift 2;;
    --detach|--all) shift;;
    --image-path) shift 2;;
    create|start|kill|delete|restore|state|pause|resume|checkpoint|exec) [ -z "$verb" ] && verb="$1"; shift;;
    *) last="$1"; shift;;
  esac
done
dir=$(dirname "$log")
case "$verb" in
  create) pwd > "$dir/fake.cwd"; sleep 1000 >/dev/null 2>&1 </dev/null & echo $! > "$pidfile"; echo $! > "$dir/fake.pid";;
  start|pause|resume) ;;
  exec) sleep 1000 >/dev/null 2>&1 </dev/null & echo $! > "$pidfile";;
  kill) kill -"$last" "$(cat "$dir/fake.pid")";;
  delete) ;;
  checkpoint) echo 'Error (criu/cr-dump.c:2100): fake dump failure' > "$work/dump.log"; echo '{"level":"error","msg":"criu failed: type DUMP errno 0"}' >> "$log"; exit 1;;
  restore) echo '{"level":"error","msg":"criu failed: type RESTORE errno 0"}' >> "$log"; echo boom >&2; exit 1;;
esac
"#;

fn setup(dir: &Path) -> (TaskService, Arc<Captured>, Any) {
    let runc = dir.join("fake-runc");
    std::fs::write(&runc, FAKE_RUNC).unwrap();
    std::fs::set_permissions(&runc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let o = containerd_shim::protos::shim::oci::Options {
        binary_name: runc.display().to_string(),
        root: dir.join("root").display().to_string(),
        ..Default::default()
    };
    let mut any = Any::new();
    any.type_url = RUNC_OPTIONS.into();
    any.value = o.write_to_bytes().unwrap();
    let ev = Arc::new(Captured::default());
    let s = TaskService::new(
        "test",
        "",
        ev.clone(),
        Arc::new(ExitSignal::default()),
        Arc::new(EagerOnly),
    );
    (s, ev, any)
}

/// Become a subreaper and report every reaped child to the exit monitor.
fn start_reaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes no pointers.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    tokio::spawn(async {
        loop {
            use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    let _ =
                        containerd_shim::monitor::monitor_notify_by_pid(pid.as_raw(), code).await;
                    continue;
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    let _ = containerd_shim::monitor::monitor_notify_by_pid(
                        pid.as_raw(),
                        128 + sig as i32,
                    )
                    .await;
                    continue;
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_create_start_kill_wait_delete() {
    start_reaper();
    let dir = tempfile::tempdir().unwrap();
    let (s, ev, any) = setup(dir.path());
    s.watch_exits().await.unwrap();
    let bundle = dir.path().display().to_string();
    let r = s
        .task_create(CreateTaskRequest {
            id: "c1".into(),
            bundle: bundle.clone(),
            options: MessageField::some(any),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.pid > 0);
    // runc runs in the bundle, as under containerd's runc shim (wrappers such as runc-fp read
    // config.json from their working directory).
    let cwd = std::fs::read_to_string(dir.path().join("fake.cwd")).unwrap();
    assert_eq!(
        std::fs::canonicalize(cwd.trim()).unwrap(),
        std::fs::canonicalize(dir.path()).unwrap()
    );
    let dup = s
        .task_create(CreateTaskRequest {
            id: "c1".into(),
            bundle,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(dup, ShimError::AlreadyExists(_)), "{dup}");
    s.task_start(StartRequest {
        id: "c1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let st = s
        .task_state(StateRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(st.pid, r.pid);
    assert_eq!(st.status.value(), 2, "running"); // Status::RUNNING
    let e = s
        .task_delete(DeleteRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, ShimError::FailedPrecondition { .. }), "{e}");
    // Exec: added, started, killed, waited, deleted.
    let mut spec = Any::new();
    spec.value = br#"{"user":{"uid":0,"gid":0},"args":["sleep","1000"],"cwd":"/"}"#.to_vec();
    s.task_exec(ExecProcessRequest {
        id: "c1".into(),
        exec_id: "e1".into(),
        spec: MessageField::some(spec),
        ..Default::default()
    })
    .await
    .unwrap();
    let started = s
        .task_start(StartRequest {
            id: "c1".into(),
            exec_id: "e1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(started.pid > 0 && started.pid != r.pid);
    s.task_kill(KillRequest {
        id: "c1".into(),
        exec_id: "e1".into(),
        signal: 15,
        ..Default::default()
    })
    .await
    .unwrap();
    let w = tokio::time::timeout(
        Duration::from_secs(10),
        s.task_wait(WaitRequest {
            id: "c1".into(),
            exec_id: "e1".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("exec wait returns")
    .unwrap();
    assert_eq!(w.exit_status, 128 + 15);
    let d = s
        .task_delete(DeleteRequest {
            id: "c1".into(),
            exec_id: "e1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(d.pid, started.pid);
    let e = s
        .task_state(StateRequest {
            id: "c1".into(),
            exec_id: "e1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, ShimError::ProcessNotFound { .. }), "{e}");

    // Pause and resume, refused twice in a row.
    s.task_pause(PauseRequest {
        id: "c1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = s
        .task_pause(PauseRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, ShimError::FailedPrecondition { .. }), "{e}");
    s.task_resume(ResumeRequest {
        id: "c1".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // A failed dump: dump.log is kept as <bundle>/criu-dump.log and named in the error.
    let e = s
        .task_checkpoint(CheckpointTaskRequest {
            id: "c1".into(),
            path: dir.path().join("img").display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ShimError::Checkpoint { .. }), "{msg}");
    assert!(msg.contains("criu failed: type DUMP"), "{msg}");
    let copy = dir.path().join("criu-dump.log");
    assert!(msg.contains(&copy.display().to_string()), "{msg}");
    assert!(std::fs::read_to_string(&copy)
        .unwrap()
        .contains("fake dump failure"));
    s.task_kill(KillRequest {
        id: "c1".into(),
        signal: 9,
        ..Default::default()
    })
    .await
    .unwrap();
    // Let the exit be published before anyone waits (Wait must still see it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let w = tokio::time::timeout(
        Duration::from_secs(10),
        s.task_wait(WaitRequest {
            id: "c1".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("wait returns")
    .unwrap();
    assert_eq!(w.exit_status, 137);
    // A Wait that arrives after the exit was published returns at once.
    let w2 = tokio::time::timeout(
        Duration::from_secs(5),
        s.task_wait(WaitRequest {
            id: "c1".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("late wait returns")
    .unwrap();
    assert_eq!(w2.exit_status, 137);
    let e = s
        .task_kill(KillRequest {
            id: "c1".into(),
            signal: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, ShimError::ProcessFinished { .. }), "{e}");
    let d = s
        .task_delete(DeleteRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(d.exit_status, 137);
    assert_eq!(
        *ev.0.lock().unwrap(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );

    // Delete right after the exit, before anyone waited: TaskExit still comes first.
    let r = s
        .task_create(CreateTaskRequest {
            id: "c2".into(),
            bundle: dir.path().display().to_string(),
            options: MessageField::some(setup(dir.path()).2),
            ..Default::default()
        })
        .await
        .unwrap();
    s.task_start(StartRequest {
        id: "c2".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(r.pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    for _ in 0..500 {
        let st = s
            .task_state(StateRequest {
                id: "c2".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        if st.status.value() == 3 {
            break; // Status::STOPPED
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.task_delete(DeleteRequest {
        id: "c2".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let topics = ev.0.lock().unwrap().clone();
    assert_eq!(
        topics[9..],
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );

    // A restore that runc refuses: clear error naming runc's log and CRIU's restore.log.
    let dir2 = tempfile::tempdir().unwrap();
    let (s2, _ev2, any2) = setup(dir2.path());
    s2.task_create(CreateTaskRequest {
        id: "r1".into(),
        bundle: dir2.path().display().to_string(),
        checkpoint: dir2.path().join("ckpt").display().to_string(),
        options: MessageField::some(any2),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = s2
        .task_start(StartRequest {
            id: "r1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ShimError::Restore { .. }), "{msg}");
    assert!(msg.contains("criu failed"), "{msg}");
    // CRIU never ran, so there is no restore.log to point at.
    assert!(!msg.contains("restore.log"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runc_binary_that_is_not_there_fails_create_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _ev, _) = setup(dir.path());
    for (name, want) in [
        ("no-such-runc-binary", "not found in $PATH"),
        ("./missing-runc", "missing-runc"),
    ] {
        let o = containerd_shim::protos::shim::oci::Options {
            binary_name: name.into(),
            root: dir.path().join("root").display().to_string(),
            ..Default::default()
        };
        let mut any = Any::new();
        any.type_url = RUNC_OPTIONS.into();
        any.value = o.write_to_bytes().unwrap();
        let e = s
            .task_create(CreateTaskRequest {
                id: "c1".into(),
                bundle: dir.path().display().to_string(),
                options: MessageField::some(any),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{name}: {e}");
    }
}
