"""caft.agent: the judge that triages candidate directions, proposes the ablation subspace, and the review step.

Modules (import them directly; this package imports nothing heavy):
    judges      the Judge contract, JudgeRun, make_judge(TriageConfig) (picks by `triage.kind`)
    task        load_task(path | bundled name) -> TaskDescription; bundled_tasks()
    render      dossier -> prompt text (untrusted text delimited and escaped); prompt-file loader
    single      SingleLLMJudge (kind `single`); SingleJudge: one validated verdict per candidate (resumable)
    loop        AgentJudge (kind `agent`); AgentSession: tool-using agent, budgets, hypothesis board, transcript
    offline     OfflineEmbeddingJudge (kind `offline-embedding`): embedding similarity, no API
    tools       the agent's tools (drill-down, live steering, compare, board, record_verdict, finish)
    steer       HookSteerer: live steered generation on a loaded model
    selection   select(records, candidates, SelectionPolicy) -> Selection; write_selection -> subspace
    review      build_review_html / write_review: the self-contained review page
    triage      run_triage(TriageConfig, evidence_dir, controls_dir=...): the whole stage; apply_selection
    config      TriageConfig, OfflineJudgeConfig, SelectionPolicy, AgentBudget, RenderLimits
"""
