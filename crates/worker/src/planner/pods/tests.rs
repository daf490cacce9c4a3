//! The planner's per-task rules, by example and by property.
use proptest::prelude::*;

use super::*;

fn node(i: u8) -> NodeId {
    NodeId(uuid::Uuid::from_bytes([i; 16]))
}

fn task(i: u16, partition: i32) -> TaskView {
    TaskView {
        task_id: TaskId(uuid::Uuid::from_u128(u128::from(i))),
        partition,
        kind: "sleep".into(),
        program: None,
        priority: 0,
        created_at: DateTime::from_timestamp(1_700_000_000 + i64::from(i), 0).unwrap(),
        status: Status::Active,
        pod_epoch: 0,
        pod_state: PodState::None,
        owner_node: None,
        backoff: None,
    }
}

struct Fixture {
    owned: BTreeMap<i32, i64>,
    leaving: BTreeSet<i32>,
    evicting: BTreeSet<i32>,
    pods: HashMap<TaskId, PodSlot>,
    kinds: BTreeSet<String>,
    programs: BTreeSet<String>,
    together: BTreeSet<NodeId>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            owned: [(0, 7), (1, 3)].into(),
            leaving: BTreeSet::new(),
            evicting: BTreeSet::new(),
            pods: HashMap::new(),
            kinds: ["sleep".to_owned(), "exec".to_owned()].into(),
            programs: ["build".to_owned()].into(),
            together: BTreeSet::new(),
        }
    }

    fn view(&self, room: usize) -> NodeView<'_> {
        NodeView {
            node: node(1),
            owned: &self.owned,
            leaving: &self.leaving,
            evicting: &self.evicting,
            pods: &self.pods,
            kinds: &self.kinds,
            programs: &self.programs,
            room,
            lost_together: &self.together,
            server_started_at: None,
        }
    }
}

fn running(t: &TaskView, epoch: i64, owner: NodeId) -> TaskView {
    TaskView {
        pod_epoch: epoch,
        pod_state: PodState::Running,
        owner_node: Some(owner),
        ..t.clone()
    }
}

#[test]
fn an_active_task_without_a_pod_is_started_under_its_partitions_generation() {
    let f = Fixture::new();
    let plan = plan(&f.view(10), vec![task(1, 0), task(2, 1)]);
    let starts: Vec<(TaskId, i64)> = plan
        .start
        .iter()
        .map(|s| (s.task.task_id, s.generation))
        .collect();
    assert_eq!(
        starts,
        vec![(task(1, 0).task_id, 7), (task(2, 1).task_id, 3)]
    );
}

#[test]
fn starts_go_by_priority_then_age_and_stop_at_capacity() {
    let f = Fixture::new();
    let mut urgent = task(9, 0);
    urgent.priority = 5;
    let plan = plan(&f.view(2), vec![task(1, 0), task(2, 0), urgent.clone()]);
    let ids: Vec<TaskId> = plan.start.iter().map(|s| s.task.task_id).collect();
    assert_eq!(ids, vec![urgent.task_id, task(1, 0).task_id]);
    assert!(plan.starved);
}

#[test]
fn no_start_on_a_leaving_or_foreign_partition_or_during_a_backoff() {
    let mut f = Fixture::new();
    f.leaving.insert(1);
    let mut backing = task(3, 0);
    backing.backoff = Some(Duration::from_millis(250));
    let plan = plan(&f.view(10), vec![task(1, 1), task(2, 5), backing.clone()]);
    assert!(plan.start.is_empty());
    assert_eq!(
        plan.backoff,
        vec![(backing.task_id, Duration::from_millis(250))]
    );
}

#[test]
fn a_kind_or_program_this_node_lacks_waits_and_is_counted() {
    let f = Fixture::new();
    let mut manual = task(1, 0);
    manual.kind = "manual".into();
    let mut other = task(2, 0);
    other.kind = "exec".into();
    other.program = Some("deploy".into());
    let mut known = task(3, 0);
    known.kind = "exec".into();
    known.program = Some("build".into());
    let plan = plan(&f.view(10), vec![manual, other, known.clone()]);
    assert_eq!(plan.unplaceable, 2);
    assert_eq!(plan.start.len(), 1);
    assert_eq!(plan.start[0].task.task_id, known.task_id);
}

#[test]
fn a_running_pod_stops_when_its_task_leaves_active_or_its_epoch_is_retired() {
    let mut f = Fixture::new();
    let base = task(1, 0);
    f.pods.insert(
        base.task_id,
        PodSlot {
            epoch: 2,
            ending: false,
        },
    );
    let me = node(1);
    let fine = running(&base, 2, me);
    assert!(plan(&f.view(10), vec![fine.clone()]).stop.is_empty());
    let cases = [
        TaskView {
            status: Status::Cancelled,
            ..fine.clone()
        },
        TaskView {
            pod_epoch: 3,
            ..fine.clone()
        },
        TaskView {
            pod_state: PodState::Stopping,
            ..fine.clone()
        },
        // Its loss was recorded (by an adopter that thought this node dead).
        TaskView {
            pod_state: PodState::None,
            ..fine.clone()
        },
    ];
    for case in cases {
        assert_eq!(
            plan(&f.view(10), vec![case.clone()]).stop,
            vec![base.task_id],
            "{case:?}"
        );
    }
}

#[test]
fn busy_pods_of_a_leaving_partition_run_on_until_its_deadline() {
    let mut f = Fixture::new();
    let t = task(1, 0);
    f.pods.insert(
        t.task_id,
        PodSlot {
            epoch: 1,
            ending: false,
        },
    );
    f.leaving.insert(0);
    let row = running(&t, 1, node(1));
    assert!(plan(&f.view(10), vec![row.clone()]).stop.is_empty());
    f.evicting.insert(0);
    assert_eq!(plan(&f.view(10), vec![row]).stop, vec![t.task_id]);
}

#[test]
fn an_ending_pod_is_left_alone() {
    let mut f = Fixture::new();
    let t = task(1, 0);
    f.pods.insert(
        t.task_id,
        PodSlot {
            epoch: 1,
            ending: true,
        },
    );
    let plan = plan(&f.view(10), vec![running(&t, 1, node(1))]);
    assert_eq!(plan, Plan::default());
}

#[test]
fn pods_left_behind_are_lost_to_their_node_or_interrupted_when_they_were_ours() {
    let f = Fixture::new();
    let theirs = running(&task(1, 0), 4, node(2));
    let ours = running(&task(2, 1), 1, node(1));
    // A pod still stopping after its task ended: recorded all the same.
    let phantom = TaskView {
        status: Status::Completed,
        pod_state: PodState::Stopping,
        ..running(&task(3, 0), 2, node(2))
    };
    let plan = plan(&f.view(10), vec![theirs, ours, phantom]);
    let lost: Vec<(TaskId, i64, i64, Loss)> = plan
        .lost
        .iter()
        .map(|l| (l.task_id, l.epoch, l.generation, l.loss))
        .collect();
    assert_eq!(
        lost,
        vec![
            (task(1, 0).task_id, 4, 7, Loss::NodeLost),
            (task(2, 1).task_id, 1, 3, Loss::Interrupted),
            (task(3, 0).task_id, 2, 7, Loss::NodeLost),
        ]
    );
    assert!(plan.start.is_empty());
}

#[test]
fn nodes_lost_together_or_to_a_server_restart_are_interruptions() {
    let mut f = Fixture::new();
    f.together.insert(node(2));
    let born = |secs: u64| {
        NodeId(uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            secs,
            0,
        )))
    };
    let before_restart = born(1_700_000_000);
    let after_restart = born(1_700_000_100);
    let mut view = f.view(10);
    view.server_started_at = DateTime::from_timestamp(1_700_000_050, 0);
    let plan = plan(
        &view,
        vec![
            running(&task(1, 0), 4, node(2)),
            running(&task(2, 0), 1, before_restart),
            running(&task(3, 0), 1, after_restart),
        ],
    );
    let losses: Vec<Loss> = plan.lost.iter().map(|l| l.loss).collect();
    assert_eq!(
        losses,
        vec![Loss::Interrupted, Loss::Interrupted, Loss::NodeLost]
    );
}

fn arb_task() -> impl Strategy<Value = TaskView> {
    (
        0u16..200,
        0i32..4,
        prop::sample::select(vec!["sleep", "exec", "manual"]),
        prop::option::of(prop::sample::select(vec!["build", "deploy"])),
        -2i32..3,
        prop::sample::select(vec![
            Status::Inactive,
            Status::Active,
            Status::Completed,
            Status::Failed,
        ]),
        0i64..4,
        prop::sample::select(vec![
            PodState::None,
            PodState::Starting,
            PodState::Running,
            PodState::Stopping,
        ]),
        prop::option::of(1u8..4),
        prop::option::of(0u64..3),
    )
        .prop_map(
            |(i, partition, kind, program, priority, status, epoch, state, owner, backoff)| {
                TaskView {
                    kind: kind.into(),
                    program: program.map(Into::into),
                    priority,
                    status,
                    pod_epoch: epoch,
                    pod_state: state,
                    owner_node: owner.map(node),
                    backoff: backoff.map(Duration::from_millis),
                    ..task(i, partition)
                }
            },
        )
}

proptest! {
    /// Whatever it reads, a check never starts a task twice, never starts one that
    /// has a pod (in the table or the head), never starts or records outside the
    /// owned partitions, never exceeds capacity, and acts on every task at most once.
    #[test]
    fn a_plan_is_consistent(
        tasks in prop::collection::vec(arb_task(), 0..60),
        table in prop::collection::vec((0u16..200, 0i64..4, any::<bool>()), 0..20),
        room in 0usize..20,
        leaving in prop::collection::btree_set(0i32..4, 0..3),
    ) {
        let mut f = Fixture::new();
        f.owned = [(0, 1), (1, 1), (2, 1)].into();
        f.leaving = leaving;
        f.pods = table
            .into_iter()
            .map(|(i, epoch, ending)| (task(i, 0).task_id, PodSlot { epoch, ending }))
            .collect();
        let plan = plan(&f.view(room), tasks.clone());
        prop_assert!(plan.start.len() <= room);
        let mut acted = std::collections::HashSet::new();
        for s in &plan.start {
            prop_assert!(acted.insert(s.task.task_id));
            prop_assert!(!f.pods.contains_key(&s.task.task_id));
            prop_assert_eq!(s.task.pod_state, PodState::None);
            prop_assert_eq!(s.task.status, Status::Active);
            prop_assert!(f.owned.contains_key(&s.task.partition));
            prop_assert!(!f.leaving.contains(&s.task.partition));
        }
        for l in &plan.lost {
            prop_assert!(acted.insert(l.task_id));
            prop_assert!(!f.pods.contains_key(&l.task_id));
            prop_assert!(f.owned.contains_key(&l.partition));
        }
        for t in &plan.stop {
            prop_assert!(acted.insert(*t));
            prop_assert!(f.pods.get(t).is_some_and(|p| !p.ending));
        }
    }
}
