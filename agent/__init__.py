"""caft.agent: the judge that triages candidate directions, proposes the ablation subspace, and the review step.

Modules (import them directly; this package imports nothing heavy):
    task        load_task(path | bundled name) -> TaskDescription; bundled_tasks()
    render      dossier -> prompt text (untrusted text delimited and escaped); prompt-file loader
    single      SingleJudge: one validated verdict per candidate -> verdicts.jsonl (resumable)
    loop        AgentSession: tool-using agent with budgets, hypothesis board and transcript
    tools       the agent's tools (drill-down, live steering, compare, board, record_verdict, finish)
    steer       HookSteerer: live steered generation on a loaded model
    selection   select(records, candidates, SelectionPolicy) -> Selection; write_selection -> subspace
    review      build_review_html / write_review: the self-contained review page
    triage      run_triage(TriageConfig, evidence_dir): the whole stage; apply_selection(selection.json)
    config      TriageConfig, SelectionPolicy, AgentBudget, RenderLimits
    cli         `caft triage`, `caft triage review`, `caft triage apply`
"""
