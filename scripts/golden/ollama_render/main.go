// Renders conversations with an Ollama Modelfile's TEMPLATE and SYSTEM as Ollama's chat endpoint
// does (server/routes.go and template/template.go of ollama/ollama): the Modelfile's SYSTEM is put
// first when a conversation brings no system message; consecutive messages of one role are merged
// with a blank line; `.System` is every system message joined; `.Messages` keeps them all. Used
// by scripts/make_modelfile_golden.py.
//
//	go run scripts/golden/ollama_render/main.go < request.json
//
// request: {"template": "...", "system": "...", "conversations": [[{"role": "...", "content": "..."}]]}
// prints: a JSON list of the rendered prompts.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template      string      `json:"template"`
	System        string      `json:"system"`
	Conversations [][]message `json:"conversations"`
}

func collate(msgs []message) (string, []*message) {
	var system []string
	var collated []*message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Parse(req.Template))
	var out []string
	for _, conv := range req.Conversations {
		msgs := append([]message{}, conv...)
		if len(msgs) > 0 && msgs[0].Role != "system" && req.System != "" {
			msgs = append([]message{{Role: "system", Content: req.System}}, msgs...)
		}
		system, collated := collate(msgs)
		var b strings.Builder
		if err := tmpl.Execute(&b, map[string]any{"System": system, "Messages": collated, "Response": ""}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
