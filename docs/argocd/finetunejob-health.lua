-- Argo CD health check for kubetune.io/FineTuneJob (see docs/helm.md, "GitOps with Argo CD").
-- Healthy once the job Succeeded; Degraded when it Failed; Suspended while spec.suspend holds
-- it (or Kueue queues it); Progressing otherwise, with the progress and loss in the message.
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator"
  return hs
end
if status.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
local phase = status.phase
local message = status.message or phase
if status.progress ~= nil and status.progress.display ~= nil then
  message = phase .. " " .. status.progress.display
  if status.metrics ~= nil and status.metrics.displayLoss ~= nil then
    message = message .. ", loss " .. status.metrics.displayLoss
  end
end
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
  if status.reason ~= nil then
    message = status.reason .. ": " .. (status.message or "")
  end
elseif phase == "Suspended" or phase == "Queued" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
hs.message = message
return hs
