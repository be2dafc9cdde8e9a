// consul_decode fetches a Consul-compatible server's catalog, health and agent answers and decodes them the way
// HashiCorp's Go client (github.com/hashicorp/consul/api) does: plain encoding/json structs, every duration
// field through time.ParseDuration (the client's ReadableDuration), which refuses "" as Go clients do.
// Only the standard library: the test compiles it with Debian's golang, offline.
//
// Usage: consul_decode BASE_URL          -> one JSON report on stdout; exit 1 with the first decode error.
//
//	consul_decode -format NS...     -> time.Duration(NS).String() per argument, one per line.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
)

// seen lists every duration field decoded: "path=value" -> nanoseconds.
var seen = map[string]int64{}
var current string // the URL being decoded, for the report

// Duration decodes as the Go client's ReadableDuration: a quoted Go duration string, or a number of nanoseconds.
type Duration struct{ D time.Duration }

func (d *Duration) UnmarshalJSON(raw []byte) error {
	s := string(raw)
	if len(s) >= 2 && s[0] == '"' && s[len(s)-1] == '"' {
		v, err := time.ParseDuration(s[1 : len(s)-1])
		if err != nil {
			return err
		}
		d.D = v
	} else {
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return err
		}
		d.D = time.Duration(v)
	}
	return nil
}

func note(field string, d *Duration) {
	if d != nil {
		seen[current+" "+field] = int64(d.D)
	}
}

type HealthCheckDefinition struct {
	HTTP                                   string
	TCP                                    string
	Interval                               *Duration
	Timeout                                *Duration
	TTL                                    *Duration
	DeregisterCriticalServiceAfter         *Duration
	IntervalDuration                       *Duration
	TimeoutDuration                        *Duration
	DeregisterCriticalServiceAfterDuration *Duration
}

type HealthCheck struct {
	Node        string
	CheckID     string
	Name        string
	Status      string
	Notes       string
	Output      string
	ServiceID   string
	ServiceName string
	ServiceTags []string
	Type        string
	Interval    *Duration // Consul 1.7+ repeats the definition's interval and timeout here
	Timeout     *Duration
	ExposedPort int
	Definition  HealthCheckDefinition
	CreateIndex uint64
	ModifyIndex uint64
}

func (c *HealthCheck) record() {
	prefix := "check " + c.CheckID + " "
	note(prefix+"Interval", c.Interval)
	note(prefix+"Timeout", c.Timeout)
	d := c.Definition
	note(prefix+"Definition.Interval", d.Interval)
	note(prefix+"Definition.Timeout", d.Timeout)
	note(prefix+"Definition.TTL", d.TTL)
	note(prefix+"Definition.DeregisterCriticalServiceAfter", d.DeregisterCriticalServiceAfter)
	note(prefix+"Definition.IntervalDuration", d.IntervalDuration)
	note(prefix+"Definition.TimeoutDuration", d.TimeoutDuration)
	note(prefix+"Definition.DeregisterCriticalServiceAfterDuration", d.DeregisterCriticalServiceAfterDuration)
}

type AgentWeights struct{ Passing, Warning int }

type AgentService struct {
	Kind              string `json:",omitempty"`
	ID                string
	Service           string
	Tags              []string
	Meta              map[string]string
	Port              int
	Address           string
	TaggedAddresses   map[string]json.RawMessage `json:",omitempty"`
	Weights           AgentWeights
	EnableTagOverride bool
	CreateIndex       uint64 `json:",omitempty"`
	ModifyIndex       uint64 `json:",omitempty"`
	ContentHash       string `json:",omitempty"`
	Datacenter        string `json:",omitempty"`
}

type Node struct {
	ID              string
	Node            string
	Address         string
	Datacenter      string
	TaggedAddresses map[string]string
	Meta            map[string]string
	CreateIndex     uint64
	ModifyIndex     uint64
}

type ServiceEntry struct {
	Node    *Node
	Service *AgentService
	Checks  []*HealthCheck
}

type CatalogService struct {
	ID                       string
	Node                     string
	Address                  string
	Datacenter               string
	TaggedAddresses          map[string]string
	NodeMeta                 map[string]string
	ServiceID                string
	ServiceName              string
	ServiceAddress           string
	ServiceTags              []string
	ServiceMeta              map[string]string
	ServicePort              int
	ServiceWeights           AgentWeights
	ServiceEnableTagOverride bool
	CreateIndex              uint64
	ModifyIndex              uint64
}

type CatalogNode struct {
	Node     *Node
	Services map[string]*AgentService
}

type SessionEntry struct {
	ID        string
	Name      string
	Node      string
	LockDelay time.Duration // the Go client decodes it as nanoseconds
	Behavior  string
	TTL       string
}

type report struct {
	Fetched   []string         `json:"fetched"`
	Durations map[string]int64 `json:"durations"`
	Services  int              `json:"services"`
	Checks    int              `json:"checks"`
}

var base string
var rep = report{}

func get(path string, into interface{}) {
	current = path
	resp, err := http.Get(base + path)
	if err != nil {
		fail("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		fail("GET %s: %d %s", path, resp.StatusCode, body)
	}
	if err := json.Unmarshal(body, into); err != nil {
		fail("decode %s: %v", path, err)
	}
	rep.Fetched = append(rep.Fetched, path)
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func checks(list []*HealthCheck) {
	for _, c := range list {
		c.record()
		rep.Checks++
	}
}

func walk() {
	var services map[string][]string
	get("/v1/catalog/services", &services)
	names := make([]string, 0, len(services))
	for name := range services {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		esc := url.PathEscape(name)
		var instances []*CatalogService
		get("/v1/catalog/service/"+esc, &instances)
		var entries []*ServiceEntry
		get("/v1/health/service/"+esc, &entries)
		for _, e := range entries {
			checks(e.Checks)
		}
		var byService []*HealthCheck
		get("/v1/health/checks/"+esc, &byService)
		checks(byService)
	}
	var nodes []*Node
	get("/v1/catalog/nodes", &nodes)
	for _, n := range nodes {
		var node CatalogNode
		get("/v1/catalog/node/"+url.PathEscape(n.Node), &node)
		var nodeChecks []*HealthCheck
		get("/v1/health/node/"+url.PathEscape(n.Node), &nodeChecks)
		checks(nodeChecks)
	}
	var all []*HealthCheck
	get("/v1/health/state/any", &all)
	checks(all)
	var agentServices map[string]*AgentService
	get("/v1/agent/services", &agentServices)
	rep.Services = len(agentServices)
	for id := range agentServices {
		var one AgentService
		get("/v1/agent/service/"+url.PathEscape(id), &one)
	}
	var agentChecks map[string]*HealthCheck
	get("/v1/agent/checks", &agentChecks)
	for _, c := range agentChecks {
		c.record()
		rep.Checks++
	}
	var sessions []*SessionEntry
	get("/v1/session/list", &sessions)
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-format" {
		for _, arg := range os.Args[2:] {
			ns, err := strconv.ParseInt(arg, 10, 64)
			if err != nil {
				fail("not a number of nanoseconds: %s", arg)
			}
			fmt.Println(time.Duration(ns).String())
		}
		return
	}
	if len(os.Args) != 2 {
		fail("usage: consul_decode BASE_URL | -format NS...")
	}
	base = strings.TrimRight(os.Args[1], "/")
	walk()
	rep.Durations = seen
	out, _ := json.Marshal(rep)
	fmt.Println(string(out))
}
