-- The W3C trace context of the head's last writer. The worker that mints a pod, or
-- records the loss of one, continues the trace of the change that asked for it (a
-- CreateTask with auto_start, a StartPod, a crash), so one trace shows a task's path
-- across the API and the workers. Updated with the head by every append (still a HOT
-- update: the column is in no index); NULL while nothing traced the task.
ALTER TABLE task_heads ADD COLUMN traceparent text;
