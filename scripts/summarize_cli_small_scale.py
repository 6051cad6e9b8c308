#!/usr/bin/env python3
"""Prints the table of examples/cli_small_scale.sh results: python scripts/summarize_cli_small_scale.py DIR."""
import json, os, sys
d = sys.argv[1]
for m in ["resnet20", "mobilenetv2", "vit_tiny_4"]:
  f = lambda s: os.path.join(d, f"{m}-{s}.json")
  if not os.path.exists(f("unlearn")): print(m, "incomplete"); continue
  pre = json.load(open(f("pretrain"))) if os.path.exists(f("pretrain")) else None
  tr = json.load(open(f("train"))); rt = json.load(open(f("retrain"))); u = json.load(open(f("unlearn")))
  ev = json.load(open(f("retrain-eval-train")))
  cls0 = ev["per_class_accuracy"]["airplane"]
  if pre: print(f"{m} pretrain: {pre['num_train']} imgs, {pre['epochs_done']} ep, test {100*pre['test_accuracy']:.1f}% on {pre['num_test']}, {pre['seconds_total']:.0f}s")
  b, a = u["before"], u["after"]
  print(f"{m} train: {tr['num_train']} imgs, train acc {100*tr['train_accuracy']:.1f}, test {100*tr['test_accuracy']:.1f} ({tr['num_test']}), {tr['seconds']:.0f}s; PEFT {tr['num_peft']}/{tr['num_total']}")
  print(f"| {m} | Before | {100*b['retain']:.1f} | {100*b['forget']:.1f} | {100*b['test']:.1f} | {100*b['test_retained_classes']:.1f} | {100*b['test_forgotten_classes']:.1f} | {tr['seconds']:.0f} |")
  print(f"| {m} | Fast-NTK | {100*a['retain']:.1f} | {100*a['forget']:.1f} | {100*a['test']:.1f} | {100*a['test_retained_classes']:.1f} | {100*a['test_forgotten_classes']:.1f} | {u['diagnostics']['seconds']:.0f} |")
  # retrain: D_r accuracy = train acc on its own D_r; D_f from eval on train split
  print(f"| {m} | Retrain | {100*rt['train_accuracy']:.1f} | {100*cls0:.1f} | {100*rt['test_accuracy']:.1f} | | | {rt['seconds']:.0f} |")
  print("   diag:", {k: u['diagnostics'][k] for k in ('solver','num_params','cond','relative_residual')})
